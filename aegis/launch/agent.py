"""The per-node agent: start this node's engine processes, restart them when they die, stop them cleanly.

One agent runs on every node (one launcher step for the whole job). It reads
the run directory (plan, allocation, config, api_key), starts the engine ranks
placed on its node (`aegis.launch.ranks`) with their device mask, CPU binding,
port and log file, restarts a rank that dies (with backoff, up to
max_restarts), and reports a NodeStatus after every change. On SIGTERM, or
when its parent goes away, it stops its own process groups (SIGTERM, then
SIGKILL after the grace period). It never signals processes it did not start.
Its engines get SIGTERM from the kernel when the agent dies, however it dies
(parent-death signal), so none keeps serving the run's key unsupervised.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from aegis.launch.node_status import NodeStatus, RankState
from aegis.launch.ranks import Rank
from aegis.rundir import RunDir
from aegis.util.ports import taken
from aegis.util.procs import die_with_parent, signal_group, stop_groups

POLL = 0.5  # seconds between checks: a dead rank is seen within a second
LOG_TAIL = 20


def log_tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def note(log, text: str) -> None:
    """aegis's own line in an engine's log; lost, not fatal, when the filesystem is full."""
    try:
        log.write(text.encode())
        log.flush()
    except OSError:
        pass


DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # engines are never behind a proxy


def progress(url: str, key: str | None, deadline: float) -> tuple[float, float] | None:
    """(requests running, tokens counted: prompt + generated) from an engine's vLLM-named /metrics, or None."""
    from aegis.bench.prom import parse_metrics

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with DIRECT.open(req, timeout=deadline) as resp:
            values = parse_metrics(resp.read().decode(errors="replace"))
    except Exception:  # no answer, or not metrics: the health probe judges answering
        return None
    if "running" not in values or "generation_tokens_total" not in values:
        return None
    return values["running"], values.get("prompt_tokens_total", 0.0) + values["generation_tokens_total"]


def answers(url: str, deadline: float) -> bool:
    """Whether a server answers `url` (any HTTP status: a key-protected route's 401 is an answer) in time."""
    try:
        DIRECT.open(url, timeout=deadline).close()
    except urllib.error.HTTPError:
        return True
    except Exception:  # refused, timed out, reset, a broken status line: no answer
        return False
    return True


class Agent:
    def __init__(self, run: RunDir, index: int, ranks: list[Rank], max_restarts: int, grace: float, host: str,
                 restart_window: float = 3600.0, liveness_interval: float = 0.0, liveness_misses: int = 3,
                 heartbeat: float = 30.0, liveness_stall: float = 0.0, key: str | None = None):
        self.run = run
        self.index = index
        self.ranks = ranks
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.grace = grace
        self.host = host
        self.liveness_interval = liveness_interval
        self.liveness_misses = liveness_misses
        self.liveness_stall = liveness_stall
        self.key = key  # the run's key: the engines' /metrics are behind it
        self.heartbeat = heartbeat
        self.stopping = False
        self.unwritten = False  # the last status write failed (retried every round)
        self.parent = os.getppid()
        run.nodes.mkdir(exist_ok=True)

    # -- processes --------------------------------------------------------------------

    def _start(self, rank: Rank) -> None:
        # The planned cores, even outside this agent's own affinity: a launcher that binds the agent
        # (srun's default --cpu-bind on a 1-CPU task) must not squeeze every engine onto the agent's
        # core. Only where the kernel refuses (the job's cpuset lacks them) the planned cores this
        # agent may use are taken, and where there are none the engine inherits the agent's.
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        planned = list(rank.cpus)
        fallback = [c for c in planned if c in allowed]

        orphan_guard = die_with_parent()

        def bind() -> None:  # runs in the child before exec
            orphan_guard()  # SIGTERM when this agent dies, even by SIGKILL
            for cpus in (planned, fallback):
                if cpus:
                    try:
                        os.sched_setaffinity(0, cpus)
                        return
                    except OSError:
                        continue

        rank.answered, rank.misses = False, 0  # liveness counts misses only once this process has answered
        rank.progress, rank.progress_at, rank.stalled = None, time.monotonic(), 0.0
        log = open(rank.log, "ab", buffering=0)  # unbuffered: a full disk fails a write, not close()
        rank.log_offset = log.tell()  # the new process's lines start here
        host, port = rank.listen or ("", 0)
        held = taken(host, port) if rank.listen else None
        if held:  # another run (or anything) serves there: never start, never let its answers count as ours
            note(log, f"\n=== aegis: not starting {rank.key} at {time.ctime()}: port {port} on {host} is held "
                      f"by {held}\n")
            log.close()
            rank.proc, rank.exit_code = None, -1
            self._died(rank)  # retried with backoff; failed after max_restarts, this line in its error
            return
        note(log, f"\n=== aegis: starting {rank.key} (attempt {rank.restarts + 1}) at {time.ctime()}: "
                  f"{shlex.join(rank.argv)}\n")
        try:
            rank.proc = subprocess.Popen(rank.argv, env=rank.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=bind,
                                         cwd=str(self.run.path))
            rank.state = RankState.STARTING if rank.restarts == 0 else RankState.RESTARTING
            rank.started_at = time.time()
            rank.first_started_at = rank.first_started_at or rank.started_at
            rank.exit_code = None
        except OSError as exc:
            note(log, f"=== aegis: cannot start: {exc}\n")
            rank.proc = None
            rank.exit_code = -1
            self._died(rank)
        finally:
            log.close()

    def _died(self, rank: Rank) -> None:
        """A rank's process ended: restart it after a backoff, or give up after max_restarts."""
        if self.stopping:
            rank.state = RankState.STOPPED
            return
        now = time.monotonic()
        rank.restart_times = [t for t in rank.restart_times if now - t < self.restart_window]
        if len(rank.restart_times) >= self.max_restarts:  # max_restarts within the window, not over the run
            rank.state = RankState.FAILED
            rank.tail = log_tail(rank.log)
            return
        rank.restart_times.append(now)
        rank.restarts += 1
        rank.state = RankState.RESTARTING
        rank.next_start = time.monotonic() + min(60.0, 2.0 ** (rank.restarts - 1))

    def _seen_loaded(self, rank: Rank) -> bool:
        """Whether the rank's log (read on from where the last look ended) now says the weights are loaded."""
        assert rank.loaded_marker is not None
        try:
            with open(rank.log, "rb") as fh:
                pos = max(0, rank.log_offset - len(rank.loaded_marker))  # a marker split between two looks
                fh.seek(pos)
                chunk = fh.read(1 << 20)
        except OSError:
            return False
        rank.log_offset = pos + len(chunk)
        return rank.loaded_marker in chunk

    def check(self) -> bool:
        """One supervision round; True when something changed."""
        changed = False
        for rank in self.ranks:
            if rank.proc is not None and rank.loaded_at is None and rank.loaded_marker and self._seen_loaded(rank):
                rank.loaded_at = time.time()
                changed = True
            if rank.proc is not None and (rank.misses >= self.liveness_misses or rank.stalled):
                self._hung(rank)
            if rank.proc is not None:
                code = rank.proc.poll()
                if code is not None:
                    # The engine's own children (engine core, workers) outlive it: end its group.
                    signal_group(rank.proc.pid, signal.SIGKILL)
                    rank.exit_code = code
                    rank.proc = None
                    self._died(rank)
                    changed = True
                elif rank.state in (RankState.STARTING, RankState.RESTARTING):
                    rank.state = RankState.RUNNING
                    changed = True
            elif rank.state == RankState.RESTARTING and time.monotonic() >= rank.next_start and not self.stopping:
                self._start(rank)
                changed = True
        return changed

    def _hung(self, rank: Rank) -> None:
        """A started engine stopped answering: kill its group; the next round restarts it like a crash."""
        assert rank.proc is not None
        why = (f"had requests running and counted no token for {rank.stalled:.0f} s (liveness_stall)"
               if rank.stalled else
               f"did not answer {rank.misses} liveness probes ({self.liveness_interval:g} s apart)")
        with open(rank.log, "ab", buffering=0) as log:
            note(log, f"\n=== aegis: {rank.key} {why} at {time.ctime()}: killed, to be restarted\n")
        rank.misses, rank.stalled = 0, 0.0
        signal_group(rank.proc.pid, signal.SIGKILL)

    def probe_once(self, pool) -> None:
        """Ask every started engine once; count misses of those that answered before (they may be hung)."""
        live = [(r, proc.pid) for r in self.ranks if r.health_url and (proc := r.proc) is not None]
        deadline = max(1.0, min(5.0, self.liveness_interval))
        results = pool.map(lambda rp: answers(rp[0].health_url, deadline), live)
        for (rank, pid), ok in zip(live, results):
            if rank.proc is None or rank.proc.pid != pid:
                continue  # restarted meanwhile: this answer is about the old process
            if ok:
                rank.answered, rank.misses = True, 0
            elif rank.answered:
                rank.misses += 1
        if self.liveness_stall > 0:
            busy = [(r, pid) for r, pid in live if r.metrics_url and r.answered and not r.misses]
            looks = pool.map(lambda rp: progress(rp[0].metrics_url, self.key, deadline), busy)
            for (rank, pid), seen in zip(busy, looks):
                if seen is not None and rank.proc is not None and rank.proc.pid == pid:
                    self._progress(rank, *seen)

    def _progress(self, rank: Rank, running: float, tokens: float) -> None:
        """The stall check: an engine that answers but, with requests running, counts no token (prompt or
        generated) for liveness_stall seconds is hung (an engine core stuck in a collective, say)."""
        now = time.monotonic()
        if running <= 0 or rank.progress is None or tokens != rank.progress:
            rank.progress_at = now
        rank.progress = tokens
        if now - rank.progress_at >= self.liveness_stall:
            rank.stalled = now - rank.progress_at

    def _probe_forever(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=16, thread_name_prefix="liveness") as pool:
            while not self.stopping:
                started = time.monotonic()
                self.probe_once(pool)
                time.sleep(max(0.0, self.liveness_interval - (time.monotonic() - started)))

    def stop(self) -> None:
        """Stop every rank's own process group (SIGTERM, SIGKILL after the grace period), wait until gone."""
        self.stopping = True
        live = [r for r in self.ranks if r.proc is not None]
        stop_groups([r.proc for r in live if r.proc is not None], self.grace)
        for rank in live:
            assert rank.proc is not None
            rank.exit_code = rank.proc.returncode
            rank.proc = None
        for rank in self.ranks:
            if rank.state != RankState.FAILED:
                rank.state = RankState.STOPPED

    def _hold_head(self) -> None:
        """Hold a connection to the head (head.json names its port): when this agent dies, however it dies,
        the kernel closes it and the head knows at once. Reconnects while the agent lives; where there is
        no connection, the heartbeats in the status file still tell."""
        import json

        while not self.stopping:
            try:
                head = json.loads(self.run.head.read_text())
                with socket.create_connection((head["host"], int(head["agent_port"])), timeout=10) as conn:
                    conn.sendall(json.dumps({"index": self.index, "pid": os.getpid(),
                                             "token": head["agent_token"]}).encode() + b"\n")
                    conn.settimeout(None)
                    while conn.recv(256):
                        pass
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(min(5.0, self.heartbeat))

    # -- reporting ----------------------------------------------------------------------

    def status(self) -> NodeStatus:
        return NodeStatus(index=self.index, host=self.host, agent_pid=os.getpid(), updated=time.time(),
                          stopping=self.stopping, ranks={r.key: r.status() for r in self.ranks})

    def write_status(self) -> bool:
        """Report to the head; a write that fails (a full filesystem) is said once on stderr and retried."""
        try:
            self.status().write(self.run.node_status(self.index))
        except OSError as exc:
            if not self.unwritten:
                try:  # its stderr may be on the same full filesystem
                    print(f"aegis agent on {self.host}: cannot write its status ({exc.strerror or exc}); its "
                          "engines stay supervised", file=sys.stderr, flush=True)
                except OSError:
                    pass
            self.unwritten = True
            return False
        self.unwritten = False
        return True

    def run_until_stopped(self) -> int:
        signal.signal(signal.SIGTERM, lambda *a: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *a: setattr(self, "stopping", True))
        for rank in self.ranks:
            self._start(rank)
        self.write_status()
        if self.liveness_interval > 0:
            threading.Thread(target=self._probe_forever, name="liveness", daemon=True).start()
        threading.Thread(target=self._hold_head, name="head-connection", daemon=True).start()
        last = time.monotonic()
        while not self.stopping:
            if self.check() or self.unwritten or time.monotonic() - last >= self.heartbeat:
                self.write_status()  # also a heartbeat: the head counts an agent silent for 4 of them as lost
                last = time.monotonic()
            if os.getppid() != self.parent:  # the launcher went away: do not leave engines behind
                break
            time.sleep(POLL)
        self.stop()
        self.write_status()
        return 0


def _ours(pid: int | None, run: RunDir, agent: bool):
    """The process `pid` if it is this run's agent (by its command line) or engine (by its working directory)."""
    import psutil

    if not pid or pid == os.getpid():
        return None
    try:
        proc = psutil.Process(pid)
        if agent:
            argv = proc.cmdline()
            return proc if "agent" in argv and str(run.path) in argv else None
        return proc if proc.cwd() == str(run.path) else None
    except psutil.Error:
        return None


def take_over(run: RunDir, index: int, host: str, grace: float) -> list[int]:
    """End what a predecessor agent of this node left: the agent itself when it still exists (hung, stopped,
    cut off from the run directory) and its engines, so a new agent starts on free ports. The pids ended."""
    import psutil

    old = NodeStatus.read(run.node_status(index))
    if old is None or old.host != host:
        return []
    agent = _ours(old.agent_pid, run, agent=True)
    engines = [p for r in old.ranks.values() if (p := _ours(r.pid, run, agent=False)) is not None]
    ended = []
    if agent is not None:
        agent.kill()  # its engines get SIGTERM from the kernel (parent-death signal)
        ended.append(agent.pid)
    _, alive = psutil.wait_procs(engines, timeout=grace)
    for proc in alive:
        signal_group(proc.pid, signal.SIGKILL)  # each engine leads its own process group
    psutil.wait_procs(alive, timeout=5)
    return ended + [p.pid for p in engines]


def run_agent(run: RunDir) -> int:
    """The agent of this node: build its ranks from the run directory and supervise them until stopped."""
    from aegis.config.schema import load_yaml, resolve
    from aegis.config.sites import run_site
    from aegis.launch.allocation import Allocation, node_index
    from aegis.launch.ranks import build_ranks

    alloc = Allocation.read(run.allocation)
    cfg = resolve(load_yaml(run.config), str(run.config))
    site = run_site(run.path, alloc.site).resolved()
    index = node_index(alloc.hosts)
    ended = take_over(run, index, socket.gethostname(), cfg.shutdown_grace)
    if ended:
        print(f"aegis agent on {socket.gethostname()}: ended what the previous agent of this node left "
              f"(pids {' '.join(map(str, ended))})", file=sys.stderr, flush=True)
    ranks = build_ranks(run, index, site, cfg, run.read_plan(), alloc.addresses, run.read_api_key())
    agent = Agent(run, index, ranks, cfg.max_restarts, cfg.shutdown_grace, socket.gethostname(),
                  restart_window=cfg.restart_window, liveness_interval=cfg.liveness_interval,
                  liveness_misses=cfg.liveness_misses, heartbeat=cfg.heartbeat_interval,
                  liveness_stall=cfg.liveness_stall, key=run.read_api_key())
    return agent.run_until_stopped()
