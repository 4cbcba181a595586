"""The head of `aegis launch`: start the agents (one launcher step), gate on health, publish, shut down.

The head never starts engines itself: one `srun`/`mpiexec` step (or, on the
local site, one process) runs an agent per node. The head checks every
instance concurrently (GET /health, then /v1/models must list the model),
reports per-instance ready times, keeps the endpoints file current as
instances start, die, restart or fail (`next_state`), and stops everything on
SIGTERM/SIGINT or when `aegis shutdown` drops a `shutdown` file into the run
directory: SIGTERM to the step (srun/mpiexec forward it to the agents, which
stop their engines), SIGKILL after the grace period.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import random
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import psutil

from aegis.config.schema import Config
from aegis.config.sites import Site
from aegis.errors import AegisError
from aegis.launch.allocation import Allocation
from aegis.launch.endpoints import PHASES, EndpointsFile, InstanceEndpoint, InstanceState, RunState
from aegis.launch.health import Probe, probe_all
from aegis.launch.keeper import WHOLE_STEP, AgentKeeper
from aegis.launch.node_status import NodeStatus, RankState, RankStatus
from aegis.plan.placement import Plan
from aegis.rundir import RunDir
from aegis.util.fs import atomic_write
from aegis.util.procs import stop_groups

S = InstanceState
log = logging.getLogger("aegis")
LOST_AFTER = 4  # heartbeats an agent may miss before its node counts as lost
READY_PROBE_INTERVAL = 5.0  # seconds between health probes of a ready instance (others: every round)
DROP_GRACE = 3.0  # seconds an agent's closed connection may stay closed (a reconnect) before it counts as lost
REPORT_WITHIN = 60.0  # seconds (plus a heartbeat) a new agent has to send its first report
QUIET_ABOVE = 32  # more instances than this: progress lines instead of one line per instance


def user() -> str:
    """This user's name (the node-local staging directory is aegis-<user>)."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def safe(echo: Callable[[str], None]) -> Callable[[str], None]:
    """`echo` that never raises: the head's output file may sit on a full filesystem."""
    def say(msg: str) -> None:
        try:
            echo(msg)
        except OSError:
            pass
    return say


def next_state(inst: InstanceEndpoint, ranks: list[RankStatus], probe: Probe | None, since: float, now: float,
               startup_timeout: float) -> tuple[InstanceState, str | None]:
    """The new state of one instance (and its error) from its ranks' reports and its health probe.

    failed stays failed; a failed rank fails the instance; a replaced, restarting or vanished
    rank makes it restarting; a passing probe makes it ready; a failing probe makes a ready one
    unhealthy (no probe this round keeps it ready); starting/restarting/unhealthy for longer
    than `startup_timeout` is failed.
    """
    head = next((r for r in ranks if r.rank == 0 and not r.part), None)
    replaced = bool(head and inst.pid and head.pid and head.pid != inst.pid)
    failed = [r for r in ranks if r.state == RankState.FAILED]
    if inst.status == S.FAILED:
        return S.FAILED, inst.error
    if failed:
        r = failed[0]
        tail = r.log_tail.strip().splitlines()
        if r.exit_code is None and tail:  # never exited as far as anyone saw: its agent was lost
            return S.FAILED, f"{tail[-1]}; log: {r.log}"
        return S.FAILED, (f"exited {r.exit_code} after {r.restarts} restart(s); log: {r.log}"
                          + (f"; last line: {tail[-1][:200]}" if tail else ""))
    if replaced or any(r.state == RankState.RESTARTING for r in ranks) or (
            inst.status == S.READY and any(r.pid is None for r in ranks)):
        return S.RESTARTING, inst.error
    if probe is not None and probe.ok:
        return S.READY, None
    if inst.status == S.READY:  # not probed this round (None): its process is alive, it stays ready
        return (S.READY, inst.error) if probe is None else (S.UNHEALTHY, probe.error)
    if inst.status in (S.STARTING, S.RESTARTING, S.UNHEALTHY) and now - since > startup_timeout:
        return S.FAILED, (f"not healthy after {startup_timeout:g} s ({probe.error if probe else ''}); "
                          f"log: {inst.log}")
    return inst.status, inst.error


def overall_state(states: list[InstanceState], previous: RunState) -> RunState:
    """The run's state from its instances' (a run once ready that loses an instance is degraded)."""
    if all(s == S.READY for s in states):
        return RunState.READY
    if all(s == S.FAILED for s in states):
        return RunState.FAILED
    if any(s == S.FAILED for s in states) and S.STARTING not in states:
        return RunState.DEGRADED
    if previous in (RunState.READY, RunState.DEGRADED):
        return RunState.DEGRADED
    return RunState.STARTING


class Head:
    def __init__(self, run: RunDir, site: Site, cfg: Config, plan: Plan, alloc: Allocation,
                 echo: Callable[[str], None] | None = None):
        self.run = run
        self.site = site
        self.cfg = cfg
        self.plan = plan
        self.alloc = alloc
        self.echo = safe(echo or (lambda msg: click.echo(msg, err=True)))
        self.unwritten = False  # the last endpoints.json write failed (retried every round)
        self.stop_requested = False
        self.step: subprocess.Popen | None = None
        self.step_argv: list[str] = []
        self.step_started = 0.0  # unix time the current launcher step was started
        self.agent_token = secrets.token_urlsafe(24)  # agents prove they are this run's (head.json, 0600)
        self.agents_held: dict[int, int] = {}  # node index -> pid of the agent holding a connection to the head
        self.agents_dropped: dict[int, tuple[int, float]] = {}  # node index -> (pid, monotonic time it closed)
        self.key: str | None = None
        self.t0 = time.monotonic()
        self.since: dict[str, float] = {}
        self.exit_code = 0
        self.next_probe: dict[str, float] = {}  # ready instances: when to probe next
        self.status_cache: dict[Path, tuple[int, NodeStatus | None]] = {}  # by mtime_ns
        self.quiet = len(plan.instances) > QUIET_ABOVE
        self.last_progress = 0.0
        self.gateway: subprocess.Popen | None = None  # the run's own gateway (config `gateway: true`)
        self.gateway_started = 0.0
        self.gateway_host = ""  # the first node's serving address, where the run's gateway listens
        self.keeper: AgentKeeper | None = None  # replacement agents (run_all sets it up)
        self.doc = EndpointsFile(job_id=alloc.job_id, run_dir=str(run.path), site=site.name,
                                 scheduler=alloc.scheduler, started=psutil.Process().create_time())

    @property
    def instances(self) -> list[InstanceEndpoint]:
        return self.doc.instances

    # -- set-up ------------------------------------------------------------------------

    def _prepare(self) -> None:
        run = self.run
        run.logs.mkdir(exist_ok=True)
        run.nodes.mkdir(exist_ok=True)
        for stale in [run.shutdown, *run.node_statuses()]:
            stale.unlink(missing_ok=True)
        if self.cfg.api_key:
            self.key = secrets.token_urlsafe(32)
            atomic_write(run.api_key, self.key + "\n", mode=0o600)
            self.doc.api_key_file = str(run.api_key)
        self._write_head_record()
        from aegis.engines import get_engine

        addresses = self.alloc.addresses or [self.site.serve_address.address(h) for h in self.alloc.hosts]
        if self.cfg.gateway:
            self.gateway_host = addresses[0]
            self.doc.gateway = f"http://{addresses[0]}:{self.cfg.gateway_port}"
        specs = {m.short_name: m for m in self.cfg.models}
        adapters = {s.short_name: (list(s.lora.resolved()) if s.lora is not None else []) for s in self.cfg.models}
        for inst in self.plan.instances:
            spec = specs[inst.model_name]
            addr = addresses[inst.head.node]
            self.instances.append(InstanceEndpoint(
                name=inst.name,
                model=get_engine(spec.engine).served_name(spec.model, spec.engine_args, spec.short_name),
                lora_adapters=adapters[spec.short_name], url=f"http://{addr}:{inst.port}", host=addr,
                hostname=self.alloc.hosts[inst.head.node], port=inst.port, node=inst.head.node,
                devices=[d for p in inst.placement for d in p.devices],
                nodes=[self.alloc.hosts[p.node] for p in inst.placement], engine=spec.engine,
                status=S.STARTING, log=str(run.log(inst.name))))
            self.since[inst.name] = self.t0

    def _write_head_record(self, agent_port: int | None = None) -> None:
        """head.json: who the head is (pid, start time, host) and where agents hold their connection to it."""
        me = psutil.Process()
        record = {"pid": me.pid, "create_time": me.create_time(), "host": socket.gethostname()}
        if agent_port is not None:
            record.update(agent_port=agent_port, agent_token=self.agent_token)
        atomic_write(self.run.head, json.dumps(record) + "\n", mode=0o600)

    async def _agent_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One agent's connection: its hello (node index, pid, the run's agent token), then silence until it
        closes, which the kernel does at once when the agent dies, however it dies."""
        hello: dict = {}
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            hello = json.loads(line) if line else {}
            if not (isinstance(hello, dict) and isinstance(hello.get("index"), int)
                    and isinstance(hello.get("pid"), int) and isinstance(hello.get("token"), str)
                    and hmac.compare_digest(hello["token"], self.agent_token)):
                return
            self.agents_held[hello["index"]] = hello["pid"]
            self.agents_dropped.pop(hello["index"], None)
            while await reader.read(256):
                pass
        except (OSError, ValueError, asyncio.TimeoutError, asyncio.CancelledError):  # cancelled: the head stops
            pass
        finally:
            writer.close()
            index = hello.get("index") if isinstance(hello, dict) else None
            if isinstance(index, int) and self.agents_held.get(index) == hello.get("pid"):
                del self.agents_held[index]
                self.agents_dropped[index] = (hello["pid"], time.monotonic())

    def _publish(self) -> None:
        """Write endpoints.json; a write that fails (a full filesystem) is said once and retried every round."""
        try:
            self.doc.write(self.run.endpoints)
        except OSError as exc:
            if not self.unwritten:
                self.echo(f"aegis: cannot write {self.run.endpoints} ({exc.strerror or exc}); the instances stay "
                          "supervised and the file is written again once there is room")
            self.unwritten = True
            return
        if self.unwritten:
            self.unwritten = False
            self.echo(f"aegis: {self.run.endpoints} written again")

    # -- the loop ----------------------------------------------------------------------

    def _node_status(self, path: Path) -> NodeStatus | None:
        """One agent's report, parsed again only when its file changed (one file per node)."""
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        cached = self.status_cache.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, NodeStatus.read(path))
            self.status_cache[path] = cached
        return cached[1]

    def _lost(self, status: NodeStatus, silent: float) -> str | None:
        """Why this node's agent counts as lost (None: it does not): silent for LOST_AFTER heartbeats, or,
        on the head's own node, its process gone (seen at once)."""
        if status.stopping:
            return None
        if silent > LOST_AFTER * self.cfg.heartbeat_interval:
            return f"its agent on {status.host} (pid {status.agent_pid}) sent no report for {silent:.0f} s: " \
                   "node or agent lost"
        if status.host == socket.gethostname() and not _alive(status.agent_pid):
            return f"its agent on {status.host} (pid {status.agent_pid}) is gone"
        dropped = self.agents_dropped.get(status.index)
        if dropped and dropped[0] == status.agent_pid and time.monotonic() - dropped[1] > DROP_GRACE:
            return f"its agent on {status.host} (pid {status.agent_pid}) is gone (its connection to the head " \
                   "closed)"
        return None

    def _agent_ranks(self) -> dict[str, list[RankStatus]]:
        """instance name -> the states its ranks' agents report.

        A lost agent's ranks come back restarting while a new agent is on its way to their node
        (AgentKeeper), failed when none is (no budget left, or the launcher could not start one).
        """
        out: dict[str, list[RankStatus]] = {}
        now = time.time()
        for path in self.run.node_statuses():
            status = self._node_status(path)
            if status is None:
                continue
            why = self._lost(status, now - status.updated)
            note = None
            if why is not None and status.updated < self.step_started \
                    and now - self.step_started < REPORT_WITHIN + self.cfg.heartbeat_interval:
                why, note = None, "the launcher step was started again; its agent has not reported yet"
            if why is None and note is None:
                if self.keeper is not None:
                    self.keeper.reported(status.index, status.agent_pid)
            elif why is not None and self.keeper is not None and not self.stop_requested:
                note = self.keeper.lost(status.index, why)
                why = self.keeper.given_up.get(status.index, why) if note is None else why
            for rank in status.ranks.values():
                if (why or note) and rank.state not in (RankState.FAILED, RankState.STOPPED):
                    rank = rank.model_copy(update={
                        "state": RankState.RESTARTING if note else RankState.FAILED, "exit_code": None,
                        "pid": None, "log_tail": note or why})
                out.setdefault(rank.instance, []).append(rank)
        return out

    def _drained(self) -> frozenset[str]:
        """The instances `aegis drain` named (all of them when it named none)."""
        from aegis.gateway.backends import read_drain

        every, names = read_drain(self.run)
        return frozenset(i.name for i in self.instances) if every else names

    def _update(self, inst: InstanceEndpoint, ranks: list[RankStatus], probe: Probe | None,
                drained: frozenset[str] = frozenset()) -> bool:
        """Apply next_state to one instance, tell the user what changed; True when something did."""
        before = (inst.status, inst.pid, inst.restarts, len(inst.phases))
        now = time.monotonic()
        head = next((r for r in ranks if r.rank == 0 and not r.part), None)
        if head:
            inst.pid, inst.restarts = head.pid, max(r.restarts for r in ranks)
            self._phase(inst, "started", head.first_started_at)
            self._phase(inst, "loaded", head.loaded_at)
        status, error = next_state(inst, ranks, probe, self.since[inst.name], now, self.cfg.startup_timeout)
        if inst.name in drained and status in (S.READY, S.UNHEALTHY, S.DRAINING):
            status = S.DRAINING  # it keeps serving what it has, and is still supervised
        if status != before[0]:
            if status == S.FAILED:
                self.echo(f"aegis: {inst.name} failed: {error}")
            elif status == S.RESTARTING:
                self.echo(f"aegis: {inst.name} died; restarting (restart {inst.restarts})")
            elif status == S.READY:
                inst.ready_seconds = round(now - self.since[inst.name], 1)
                self._phase(inst, "ready", time.time())
                self.next_probe[inst.name] = now + READY_PROBE_INTERVAL * random.random()  # spread out
                if not self.quiet:
                    self.echo(f"aegis: {inst.name} ready at {inst.url} after {inst.ready_seconds} s")
            if status in (S.RESTARTING, S.UNHEALTHY):
                self.since[inst.name] = now
        inst.status, inst.error = status, error
        return (inst.status, inst.pid, inst.restarts, len(inst.phases)) != before

    def _phase(self, inst: InstanceEndpoint, phase: str, at: float | None) -> None:
        """Record when an instance first reached a startup phase (seconds from the job's start).

        An agent's report of "loaded" can reach the head after the probe found the instance
        ready; an engine answers only once loaded, so the earlier of the two is the better bound.
        """
        if at is not None and phase not in inst.phases and self.doc.started is not None:
            seconds = round(max(0.0, at - self.doc.started), 2)
            if phase == "loaded" and "ready" in inst.phases:
                seconds = min(seconds, inst.phases["ready"])
            inst.phases[phase] = seconds
            inst.phases = {p: inst.phases[p] for p in PHASES if p in inst.phases}

    def _to_probe(self, now: float) -> list[InstanceEndpoint]:
        """Instances probed this round: every one not ready, and the ready ones whose turn it is.

        A dead process is seen from the agents' reports within a second; probes of ready
        instances find hung servers, so they can be spread out (READY_PROBE_INTERVAL).
        """
        out = []
        for inst in self.instances:
            if inst.status == S.FAILED:
                continue
            if inst.status == S.READY:
                if now < self.next_probe.get(inst.name, 0.0):
                    continue
                self.next_probe[inst.name] = now + READY_PROBE_INTERVAL
            out.append(inst)
        return out

    def _progress(self, now: float) -> None:
        """At scale: one line every 5 s while instances are starting, instead of one per instance."""
        if not self.quiet or now - self.last_progress < 5.0:
            return
        counts: dict[str, int] = {}
        for inst in self.instances:
            counts[inst.status.value] = counts.get(inst.status.value, 0) + 1
        if counts.get("ready") != len(self.instances):
            self.last_progress = now
            self.echo("aegis: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))

    # -- the run's gateway ----------------------------------------------------------------

    def _keep_gateway(self) -> None:
        """Start the run's gateway, and start it again if it died (it holds no state: it reads this run's files)."""
        if not self.cfg.gateway or self.doc.gateway is None:
            return
        proc = self.gateway
        if proc is not None:
            code = proc.poll()
            if code is None:
                return
            if code == 2:  # a usage error (its port is taken ...): starting it again would fail the same way
                self.echo(f"aegis: the gateway cannot start (see {self.run.log('gateway')}); the instances serve "
                          "without it")
                self.doc.gateway = None
                self._publish()
                return
            if time.monotonic() - self.gateway_started < 5.0:
                return
            self.echo(f"aegis: the gateway exited ({code}); starting it again")
        argv = [sys.executable, "-m", "aegis", "gateway", str(self.run.path), "--host", self.gateway_host,
                "--port", str(self.cfg.gateway_port), "--info", str(self.run.gateway)]
        with open(self.run.log("gateway"), "ab") as out:
            self.gateway = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.gateway_started = time.monotonic()

    def _drain_gateways(self) -> None:
        """Before the engines get SIGTERM: wait (up to shutdown_grace) until no gateway has a request in flight
        to this run; the gateways stopped sending new ones when the run became `stopping`."""
        from aegis.gateway.server import POLL_SECONDS, STATUS_SECONDS, gateway_inflight

        since = time.time() + POLL_SECONDS  # reports written after the gateways saw `stopping`
        deadline = time.monotonic() + self.cfg.shutdown_grace
        said = False
        while time.monotonic() < deadline:
            counts, waiting = gateway_inflight(self.run, since)
            if counts is None:
                return
            busy = sum(counts.values())
            if not busy and not waiting:
                return
            if busy and not said:
                said = True
                self.echo(f"aegis: waiting for {busy} request(s) in flight through the gateway(s)")
            time.sleep(STATUS_SECONDS / 2)
        self.echo(f"aegis: requests still in flight after {self.cfg.shutdown_grace} s; stopping anyway")

    async def _loop(self) -> None:
        announced = False
        assert self.step is not None
        try:  # agents connect to it: an agent's death is seen at once (heartbeats still cover a lost node)
            dual = socket.has_dualstack_ipv6()
            sock = socket.create_server(("", 0), family=socket.AF_INET6 if dual else socket.AF_INET,
                                        dualstack_ipv6=dual, backlog=1024)  # one port on IPv4 and IPv6
            await asyncio.start_server(self._agent_connected, sock=sock)
            self._write_head_record(sock.getsockname()[1])
        except OSError as exc:
            self.echo(f"aegis: no port for the agents' connections ({exc.strerror or exc}); lost agents are found "
                      "by their heartbeats")
        while not self.stop_requested:
            if self.run.shutdown.exists():
                self.echo("aegis: shutdown requested")
                break
            code = self.step.poll()
            if code is not None and not (self.keeper and self.keeper.covers(len(self.alloc.hosts))):
                if self._restart_step(code):
                    continue
                self.echo(f"aegis: the agents' launcher step exited ({code}); see {self.run.log('agents')}")
                for inst in self.instances:
                    if inst.status != S.FAILED:
                        inst.status, inst.error = S.FAILED, f"agent step exited ({code})"
                self.exit_code = 1
                break
            self._keep_gateway()
            drained = self._drained()
            ranks = self._agent_ranks()
            live = self._to_probe(time.monotonic())
            probes = dict(zip([i.name for i in live], await probe_all(live, self.key)))
            changed = False
            for inst in self.instances:
                changed |= self._update(inst, ranks.get(inst.name, []), probes.get(inst.name), drained)
            state = overall_state([i.status for i in self.instances], self.doc.state)
            if changed or state != self.doc.state or self.unwritten:
                self.doc.state = state
                self._publish()  # at most once a round, and rounds are a second or more apart
            self._progress(time.monotonic())
            if state == RunState.READY and not announced:
                announced = True
                slowest = max(i.ready_seconds or 0 for i in self.instances)
                self.echo(f"aegis: all {len(self.instances)} instance(s) ready in {slowest} s; "
                          f"endpoints: {self.run.endpoints}")
            if state == RunState.FAILED:
                self.echo("aegis: every instance failed; stopping")
                self.exit_code = 1
                break
            await asyncio.sleep(2.0 if state == RunState.READY else 1.0)

    def _start_step(self) -> None:
        self.step_started = time.time()
        with open(self.run.log("agents"), "ab") as out:
            self.step = subprocess.Popen(self.step_argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def _restart_step(self, code: int) -> bool:
        """The launcher step ended while the run goes on (its agents killed: on the local site the step is
        the agent; mpiexec ends every rank when one dies): start it again if the budget allows."""
        if self.stop_requested or self.run.shutdown.exists() or self.keeper is None \
                or not self.keeper.restart_step():
            return False
        self.echo(f"aegis: the agents' launcher step exited ({code}); starting it again (restart "
                  f"{len(self.keeper.tries[WHOLE_STEP])} of {self.cfg.max_restarts}; see {self.run.log('agents')})")
        now = time.monotonic()
        for inst in self.instances:
            if inst.status != S.FAILED:
                inst.status, inst.error, inst.pid = S.RESTARTING, f"its agent's launcher step exited ({code})", None
                self.since[inst.name] = now
        self.doc.state = overall_state([i.status for i in self.instances], self.doc.state)
        self._publish()
        self._start_step()
        return True

    # -- shutdown ----------------------------------------------------------------------

    def _stop(self) -> None:
        self.doc.state = RunState.STOPPING
        self._publish()
        self._drain_gateways()
        grace = self.cfg.shutdown_grace + 15
        if self.step is not None:
            stop_groups([self.step, *(self.keeper.steps() if self.keeper else [])], grace, linger=0,
                        on_kill=lambda: self.echo(f"aegis: agents still running after {grace} s; killing them"))
        if self.gateway is not None:
            stop_groups([self.gateway], 5.0, linger=0)
        for inst in self.instances:
            if inst.status != S.FAILED:
                inst.status = S.STOPPED
            inst.pid = None
        self.doc.state = RunState.STOPPED if self.exit_code == 0 else RunState.FAILED
        self._publish()
        self.echo(f"aegis: all instances stopped ({self.run.path})")

    def _stage(self) -> None:
        """Broadcast each model_source to node-local storage once (one rank per node), before any engine."""
        from aegis.launch.steps import per_node_step
        from aegis.staging import stage

        staged = {}
        private = Path(os.path.expandvars(os.path.expanduser(self.site.local_storage))) / f"aegis-{user()}"
        root = private / "models"  # inside a 0700 directory of this user's, checked on every node
        for spec in self.cfg.models:
            if not spec.model_source:
                continue
            src = Path(os.path.expanduser(spec.model_source))
            hf_layout = src.name.startswith("models--")
            dest = root / "hub" / src.name if hf_layout else root / spec.short_name
            self.echo(f"aegis: staging {src} to {dest} on {len(self.alloc.hosts)} node(s)")
            t0 = time.monotonic()
            summary = stage(str(src), str(dest), launcher=per_node_step(self.site, len(self.alloc.hosts), []),
                            private_dir=str(private))
            skipped, nodes = summary.get("skipped_nodes", 0), len(self.alloc.hosts)
            total, sent = summary.get("bytes", 0), summary.get("bytes_sent", summary.get("bytes", 0))
            parts = [f"{skipped} node(s) had it already"] if skipped else []
            if sent < total:
                parts.append(f"sent {sent / 1e9:.2f} GB in {summary.get('files_sent', 0)} of {summary.get('files', 0)} "
                             "files; the others were on every node already")
            note = " (already there)" if skipped == nodes else f" ({'; '.join(parts)})" if parts else ""
            self.echo(f"aegis: staged {summary.get('bytes', 0) / 1e9:.2f} GB in {time.monotonic() - t0:.1f} s{note}")
            # An HF cache repo is found by its id through HF_HOME; a plain directory is loaded by path.
            staged[spec.short_name] = {"hf_home": str(root), "model": spec.model} if hf_layout else \
                {"model": str(dest)}
        atomic_write(self.run.staged, json.dumps(staged, indent=2) + "\n")

    def run_all(self, agent_argv: list[str]) -> int:
        """Stage, start the agents' step (`agent_argv` once per node), gate and supervise until shutdown;
        the exit status."""
        from aegis.launch.steps import per_node_step

        self.step_argv = per_node_step(self.site, len(self.alloc.hosts), agent_argv)
        self.keeper = AgentKeeper(self.site, self.alloc.hosts, agent_argv, self.run.log, self.cfg.max_restarts,
                                  float(self.cfg.restart_window), REPORT_WITHIN + self.cfg.heartbeat_interval,
                                  self.echo)
        self._prepare()
        self._publish()
        try:
            self._stage()
        except Exception as exc:  # StageError and OSErrors: the run fails with the reason, nothing started
            for inst in self.instances:
                inst.status, inst.error = S.FAILED, f"staging failed: {exc}"
            self.doc.state = RunState.FAILED
            self._publish()
            if isinstance(exc, AegisError):
                raise
            raise AegisError(f"staging failed: {exc}") from None
        staged = time.time()
        for inst in self.instances:
            self._phase(inst, "staged", staged)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *a: setattr(self, "stop_requested", True))
        self.echo(f"aegis: starting {len(self.instances)} instance(s) on {len(self.alloc.hosts)} node(s) "
                  f"({self.alloc.scheduler} {self.alloc.job_id or ''}); logs: {self.run.logs}")
        log.debug("$ %s", shlex.join(self.step_argv))
        self._start_step()
        try:
            asyncio.run(self._loop())
        finally:
            self._stop()
        return self.exit_code
