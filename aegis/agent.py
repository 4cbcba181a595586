"""The per-node agent: start this node's engine processes, restart them, stop them cleanly.

One agent runs on every node (one launcher step for the whole job). It reads
the run directory (plan.json, allocation.json, config.yaml, api_key), starts
the engine ranks placed on its node with their device mask, CPU binding, port
and log file, restarts a rank that dies (with backoff, up to max_restarts),
and reports in `nodes/<index>.status.json`. On SIGTERM, or when its parent
goes away, it stops its own process groups: SIGTERM, then SIGKILL after the
grace period. It never signals processes it did not start.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from aegis.allocation import node_index
from aegis.config import Config, load_yaml
from aegis.engines import EngineLaunch, check_engine_site, get_engine
from aegis.fsutil import atomic_write
from aegis.sites import Site, parse_ranges, run_site

POLL = 0.5  # seconds between checks: a dead rank is seen within a second
LOG_TAIL = 20


def interface_address(name: str) -> Optional[str]:
    for addr in psutil.net_if_addrs().get(name, []):
        if addr.family == socket.AF_INET:
            return addr.address
    return None


def node_address(site: Site, host: str) -> str:
    """The address engines bind to and clients use (the site's serving network)."""
    if site.serve_address.method == "interface":
        addr = interface_address(site.serve_address.interface)
        if addr is None:
            raise RuntimeError(f"interface {site.serve_address.interface} has no IPv4 address on {host}")
        return addr
    return site.serve_address.address(host)


def interface_of(address: str) -> tuple[Optional[str], Optional[str]]:
    """(interface name, IPv4) that carries `address` on this node, for the engines' collectives."""
    try:
        ip = socket.gethostbyname(address)
    except OSError:
        return None, None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name, ip
    return None, ip


def master_port(port: int) -> int:
    """The rendezvous port of a multi-node instance, derived from its serving port."""
    return port + 20000 if port + 20000 <= 65535 else port - 20000


def log_tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _group_alive(pgid: Optional[int]) -> bool:
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Rank:
    """One engine process: an instance's part on this node."""

    instance: str
    rank: int
    argv: list[str]
    env: dict[str, str]
    cpus: list[int]
    log: Path
    head: bool
    proc: Optional[subprocess.Popen] = None
    state: str = "pending"  # starting, running, restarting, failed, stopped
    restarts: int = 0
    exit_code: Optional[int] = None
    next_start: float = 0.0
    started_at: Optional[float] = None
    pgid: Optional[int] = None
    tail: str = ""
    history: list = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.instance if self.rank == 0 else f"{self.instance}.rank{self.rank}"


def build_ranks(run_dir: Path, index: int, site: Site, cfg: Config, plan: dict, addresses: list[str],
                api_key: Optional[str]) -> list[Rank]:
    """The engine processes this node runs, from the plan."""
    specs = {m.short_name: m for m in cfg.models}
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    my_addr = node_address(site, socket.gethostname()) if site.serve_address.method == "interface" \
        else addresses[index]
    python = os.path.expanduser(cfg.engine_python) if cfg.engine_python else "python3"
    staged_path = run_dir / "staged.json"
    staged = json.loads(staged_path.read_text()) if staged_path.exists() else {}
    ranks = []
    adapters = {}  # model -> resolved LoRA adapters (listed once per model)
    engine_dir = run_dir / "engine"  # per-instance engine config files (mode 0600)
    for inst in plan["instances"]:
        spec = specs[inst["model_name"]]
        engine = get_engine(spec.engine)
        check_engine_site(spec, site)
        opts = spec.engine_options()
        if opts.lora is not None and spec.short_name not in adapters:
            adapters[spec.short_name] = opts.lora.resolved()
        placements = inst["placement"]
        head_node = placements[0]["node"]
        for r, slice_ in enumerate(placements):
            if slice_["node"] != index:
                continue
            model = os.path.expanduser(spec.model) if spec.model.startswith("~") else spec.model
            local = staged.get(spec.short_name, {})
            model = local.get("model", model)
            launch = EngineLaunch(
                model=model, served_name=engine.served_name(spec.model, spec.engine_args, spec.short_name),
                host=my_addr, port=inst["port"], tensor_parallel_size=inst["tensor_parallel_size"],
                pipeline_parallel_size=inst["pipeline_parallel_size"], extra_args=spec.engine_args,
                python=python, nnodes=len(placements), node_rank=r,
                master_addr=addresses[head_node], master_port=master_port(inst["port"]),
                options=opts, lora_adapters=adapters.get(spec.short_name, {}), instance=inst["name"],
                config_dir=str(engine_dir), api_key=bool(api_key),
                node_hosts=[addresses[p["node"]] for p in placements], devices_per_node=len(slice_["devices"]),
                device_kind=site.device_kind, visibility_vars=list(site.visibility_env))
            argv = engine.command(launch)
            if argv is None:  # this node's part is started by the instance's head (e.g. mpirun)
                continue
            env = dict(os.environ)
            env.update(site.env)
            env.update(cfg.env)
            env.update(spec.env)
            env.update(slice_["env"])
            if cfg.hf_home:
                env["HF_HOME"] = os.path.expanduser(cfg.hf_home)
            if "hf_home" in local:  # weights staged as an HF cache: load offline from node-local storage
                env["HF_HOME"] = local["hf_home"]
                env["HF_HUB_CACHE"] = os.path.join(local["hf_home"], "hub")
                env["HF_HUB_OFFLINE"] = "1"
            env.update(engine.feature_env(launch))
            if api_key:
                env.update(engine.key_env(api_key))
            for path, text in engine.files(launch, api_key).items():
                engine_dir.mkdir(mode=0o700, exist_ok=True)
                atomic_write(Path(path), text, mode=0o600)
            if len(placements) > 1:  # ranks of a multi-node instance meet on the serving network
                iface, ip = interface_of(my_addr)
                if iface:
                    env.setdefault("GLOO_SOCKET_IFNAME", iface)
                if ip:
                    env.setdefault("VLLM_HOST_IP", ip)
            name = inst["name"] if r == 0 else f"{inst['name']}.rank{r}"
            ranks.append(Rank(instance=inst["name"], rank=r, argv=argv, env=env,
                              cpus=parse_ranges(slice_["cpus"]) if slice_["cpus"] else [],
                              log=logs / f"{name}.log", head=(r == 0)))
    return ranks


class Agent:
    def __init__(self, run_dir: Path, index: int, ranks: list[Rank], max_restarts: int, grace: float,
                 host: str):
        self.run_dir = run_dir
        self.index = index
        self.ranks = ranks
        self.max_restarts = max_restarts
        self.grace = grace
        self.host = host
        self.stopping = False
        self.parent = os.getppid()
        self.status_path = run_dir / "nodes" / f"{index}.status.json"
        self.status_path.parent.mkdir(exist_ok=True)

    # -- processes --------------------------------------------------------------------

    def _start(self, rank: Rank) -> None:
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        cpus = [c for c in rank.cpus if c in allowed] or None

        def bind():  # runs in the child before exec
            if cpus:
                os.sched_setaffinity(0, cpus)

        log = open(rank.log, "ab")
        log.write(f"\n=== aegis: starting {rank.key} (attempt {rank.restarts + 1}) at {time.ctime()}: "
                  f"{' '.join(rank.argv)}\n".encode())
        log.flush()
        try:
            rank.proc = subprocess.Popen(rank.argv, env=rank.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=bind,
                                         cwd=str(self.run_dir))
            rank.state = "starting" if rank.restarts == 0 else "restarting"
            rank.started_at = time.time()
            rank.exit_code = None
        except OSError as exc:
            log.write(f"=== aegis: cannot start: {exc}\n".encode())
            rank.proc = None
            rank.exit_code = -1
            self._died(rank)
        finally:
            log.close()

    def _died(self, rank: Rank) -> None:
        rank.history.append({"at": time.time(), "exit_code": rank.exit_code})
        if self.stopping:
            rank.state = "stopped"
            return
        if rank.restarts >= self.max_restarts:
            rank.state = "failed"
            rank.tail = log_tail(rank.log)
            return
        rank.restarts += 1
        rank.state = "restarting"
        rank.next_start = time.monotonic() + min(60.0, 2.0 ** (rank.restarts - 1))

    def check(self) -> bool:
        """One supervision round; True when something changed."""
        changed = False
        for rank in self.ranks:
            if rank.proc is not None:
                code = rank.proc.poll()
                if code is not None:
                    # The engine's own children (engine core, workers) outlive it: end its group.
                    _kill_group(rank.proc.pid)
                    rank.exit_code = code
                    rank.proc = None
                    self._died(rank)
                    changed = True
                elif rank.state in ("starting", "restarting"):
                    rank.state = "running"
                    changed = True
            elif rank.state == "restarting" and time.monotonic() >= rank.next_start and not self.stopping:
                self._start(rank)
                changed = True
        return changed

    def stop(self) -> None:
        """SIGTERM every rank's own process group, then SIGKILL what is left after the grace period."""
        self.stopping = True
        live = [r for r in self.ranks if r.proc is not None]
        for rank in live:
            try:
                os.killpg(rank.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(r.proc.poll() is None for r in live):
            time.sleep(0.1)
        for rank in live:
            if rank.proc.poll() is None:
                try:
                    os.killpg(rank.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                rank.proc.wait()
            _kill_group(rank.proc.pid)  # anything the engine left in its group (workers) goes too
            rank.exit_code = rank.proc.returncode
            rank.pgid = rank.proc.pid
            rank.proc = None
            rank.state = "stopped"
        deadline = time.monotonic() + 5.0  # killed groups can take a moment to disappear
        while time.monotonic() < deadline and any(_group_alive(r.pgid) for r in live):
            time.sleep(0.05)
        for rank in self.ranks:
            if rank.state in ("pending", "restarting"):
                rank.state = "stopped"

    # -- reporting ----------------------------------------------------------------------

    def write_status(self) -> None:
        doc = {"index": self.index, "host": self.host, "agent_pid": os.getpid(), "updated": time.time(),
               "stopping": self.stopping, "ranks": {}}
        for r in self.ranks:
            doc["ranks"][r.key] = {"instance": r.instance, "rank": r.rank, "state": r.state,
                                   "pid": r.proc.pid if r.proc else None, "restarts": r.restarts,
                                   "exit_code": r.exit_code, "log": str(r.log), "log_tail": r.tail,
                                   "started_at": r.started_at}
        atomic_write(self.status_path, json.dumps(doc, indent=1) + "\n")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *a: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *a: setattr(self, "stopping", True))
        for rank in self.ranks:
            self._start(rank)
        self.write_status()
        while not self.stopping:
            if self.check():
                self.write_status()
            if os.getppid() != self.parent:  # the launcher went away: do not leave engines behind
                break
            time.sleep(POLL)
        self.stop()
        self.write_status()
        return 0


def run_agent(run_dir: Path) -> int:
    from aegis.config import resolve

    alloc = json.loads((run_dir / "allocation.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    cfg = resolve(load_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml"))
    site = run_site(run_dir, alloc["site"]).resolved()
    index = node_index(alloc["hosts"])
    key_path = run_dir / "api_key"
    api_key = key_path.read_text().strip() if key_path.exists() else None
    ranks = build_ranks(run_dir, index, site, cfg, plan, alloc["addresses"], api_key)
    agent = Agent(run_dir, index, ranks, cfg.max_restarts, cfg.shutdown_grace, socket.gethostname())
    return agent.run()
