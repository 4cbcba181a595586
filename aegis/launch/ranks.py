"""The engine processes of one node, built from the plan: command line, environment, CPU cores, log."""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from aegis.config.schema import Config
from aegis.config.sites import Site, parse_ranges
from aegis.engines import EngineLaunch, check_engine_site, engine_options, get_engine
from aegis.engines import ray as ray_backend
from aegis.launch.node_status import RankState, RankStatus
from aegis.plan.placement import Plan
from aegis.rundir import RunDir
from aegis.util.fs import atomic_write
from aegis.util.ports import rendezvous_port


def interface_address(name: str) -> str | None:
    for addr in psutil.net_if_addrs().get(name, []):
        if addr.family == socket.AF_INET:
            return addr.address
    return None


def node_address(site: Site, host: str) -> str:
    """The address engines bind to and clients use (the site's serving network)."""
    if site.serve_address.method == "interface":
        interface = site.serve_address.interface
        assert interface is not None  # ServeAddress validation: method 'interface' requires one
        addr = interface_address(interface)
        if addr is None:
            raise RuntimeError(f"interface {interface} has no IPv4 address on {host}")
        return addr
    return site.serve_address.address(host)


def interface_of(address: str) -> tuple[str | None, str | None]:
    """(interface name, IPv4) that carries `address` on this node, for the engines' collectives."""
    try:
        ip = socket.gethostbyname(address)
    except OSError:
        return None, None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name, ip
    return None, ip


master_port = rendezvous_port  # the rendezvous port of a multi-node instance (aegis.util.ports)


def rank_key(instance: str, rank: int, part: str = "") -> str:
    """`<instance>` for the head, `<instance>.rank<r>` for another node's part, `<instance>.<part>` for a companion."""
    if part:
        return f"{instance}.{part}" if rank == 0 else f"{instance}.rank{rank}.{part}"
    return instance if rank == 0 else f"{instance}.rank{rank}"


@dataclass
class Rank:
    """One engine process to run: an instance's part on this node, and its supervision state."""

    instance: str
    rank: int
    argv: list[str]
    env: dict[str, str]
    cpus: list[int]
    log: Path
    proc: subprocess.Popen | None = None
    state: RankState = RankState.PENDING
    restarts: int = 0
    exit_code: int | None = None
    next_start: float = 0.0
    started_at: float | None = None
    tail: str = ""
    loaded_marker: bytes | None = None  # the engine's "weights loaded" log text (head ranks only)
    first_started_at: float | None = None
    loaded_at: float | None = None
    log_offset: int = 0  # where the search for loaded_marker goes on in the log
    health_url: str | None = None  # head ranks: where the agent's liveness probe asks
    metrics_url: str | None = None  # head ranks of engines with vLLM's metrics: where the stall check reads progress
    progress: float | None = None  # tokens (prompt + generated) the current process had counted at the last look
    progress_at: float = 0.0  # monotonic time its count last moved, or it last had nothing running
    stalled: float = 0.0  # seconds it had requests running without a token counted (set when it counts as hung)
    listen: tuple[str, int] | None = None  # where it will listen (head: serve; Ray head: GCS), checked free first
    answered: bool = False  # the current process has answered a liveness probe (probing counts misses from then)
    misses: int = 0  # liveness probes in a row the current process did not answer
    restart_times: list[float] = field(default_factory=list)  # monotonic times of restarts (max_restarts window)
    part: str = ""  # a companion process of the rank (e.g. "ray-head"), "" for the rank's engine process

    @property
    def head(self) -> bool:
        """The instance's head rank (the one that serves HTTP)."""
        return self.rank == 0 and not self.part

    @property
    def key(self) -> str:
        return rank_key(self.instance, self.rank, self.part)

    def status(self) -> RankStatus:
        return RankStatus(instance=self.instance, rank=self.rank, part=self.part, state=self.state,
                          pid=self.proc.pid if self.proc else None, restarts=self.restarts,
                          exit_code=self.exit_code, log=str(self.log), log_tail=self.tail,
                          started_at=self.started_at, first_started_at=self.first_started_at,
                          loaded_at=self.loaded_at)


def build_ranks(run: RunDir, index: int, site: Site, cfg: Config, plan: Plan, addresses: list[str],
                api_key: str | None, *, base_env: dict[str, str] | None = None,
                my_address: str | None = None, network=interface_of, write: bool = True) -> list[Rank]:
    """The engine processes this node runs, from the plan.

    On the node, the facts only it knows come from the node itself (its environment, its
    interfaces, the staged weights); `aegis plan --commands` passes shell rules instead
    (`base_env={}`, `my_address`, `network`) and `write=False` (no directories, no files).
    """
    specs = {m.short_name: m for m in cfg.models}
    if write:
        run.logs.mkdir(exist_ok=True)
    if my_address is not None:
        my_addr = my_address
    elif site.serve_address.method == "interface":
        my_addr = node_address(site, socket.gethostname())
    else:
        my_addr = addresses[index]
    python = os.path.expanduser(cfg.engine_python) if cfg.engine_python else "python3"
    staged = run.read_json(run.staged) or {}
    ranks = []
    adapters = {}  # model -> resolved LoRA adapters (listed once per model)
    engine_dir = run.engine_dir  # per-instance engine config files (mode 0600)
    located: dict[str, tuple[str | None, str | None]] = {}  # address -> (interface, IPv4), looked up once

    def locate(address: str) -> tuple[str | None, str | None]:
        if address not in located:
            located[address] = network(address)
        return located[address]

    for inst in plan.instances_on(index):
        spec = specs[inst.model_name]
        engine = get_engine(spec.engine)
        check_engine_site(spec, site)
        opts = engine_options(spec, site)
        if opts.lora is not None and spec.short_name not in adapters:
            adapters[spec.short_name] = opts.lora.resolved()
        placements = inst.placement
        head_node = placements[0].node
        ray = len(placements) > 1 and opts.multinode_backend == "ray"
        for r, slice_ in enumerate(placements):
            if slice_.node != index:
                continue
            model = os.path.expanduser(spec.model) if spec.model.startswith("~") else spec.model
            local = staged.get(spec.short_name, {})
            model = local.get("model", model)
            cpus = parse_ranges(slice_.cpus) if slice_.cpus else []
            multi_device = inst.tensor_parallel_size * inst.pipeline_parallel_size > 1
            iface, ip = locate(my_addr) if multi_device else (None, None)
            env = dict(os.environ if base_env is None else base_env)
            env.update(site.env)
            if ray:
                env.update(site.ray_env)  # the site's Ray set-up (ALCF's setup_ray_cluster.sh)
            env.update(cfg.env)
            env.update(spec.env)
            env.update(slice_.env)
            launch = EngineLaunch(
                model=model, served_name=engine.served_name(spec.model, spec.engine_args, spec.short_name),
                host=my_addr, port=inst.port, tensor_parallel_size=inst.tensor_parallel_size,
                pipeline_parallel_size=inst.pipeline_parallel_size, extra_args=spec.engine_args,
                python=python, nnodes=len(placements), node_rank=r,
                master_addr=addresses[head_node], master_port=master_port(inst.port),
                options=opts, lora_adapters=adapters.get(spec.short_name, {}), instance=inst.name,
                config_dir=str(engine_dir), api_key=bool(api_key),
                node_hosts=[addresses[p.node] for p in placements], devices_per_node=len(slice_.devices),
                device_kind=site.device_kind, visibility_vars=list(site.visibility_env), node_ip=ip,
                cpus=len(cpus), tmpdir=ray_backend.temp_root(env) if ray else env.get("TMPDIR", ""),
                workarounds=site.engine_workarounds.get(spec.engine, []))
            argv = engine.command(launch)
            if argv is None:  # this node's part is started by the instance's head (e.g. mpirun)
                continue
            if cfg.hf_home:
                env["HF_HOME"] = os.path.expanduser(cfg.hf_home)
            if "hf_home" in local:  # weights staged as an HF cache: load offline from node-local storage
                env["HF_HOME"] = local["hf_home"]
                env["HF_HUB_CACHE"] = os.path.join(local["hf_home"], "hub")
                env["HF_HUB_OFFLINE"] = "1"
            if multi_device:
                # Workers meet on the serving network (the site's high-speed one), on one node too:
                # ALCF sets VLLM_HOST_IP for every TP > 1 (vllm.md, "Serving Medium Models").
                if iface:
                    env.setdefault("GLOO_SOCKET_IFNAME", iface)
                if ip:
                    env.setdefault("VLLM_HOST_IP", ip)
            companion_env = dict(env)  # a companion (a Ray head) gets neither the key nor the engine's paths
            serves = not (ray and r > 0)  # a Ray worker node runs `ray start`, not the server
            if serves:
                env.update(engine.feature_env(launch))
                env.update(engine.companion_env(launch))
                if api_key:
                    env.update(engine.key_env(api_key))
                engine.with_paths(env, launch)
                for path, text in engine.files(launch, api_key).items() if write else ():
                    engine_dir.mkdir(mode=0o700, exist_ok=True)
                    atomic_write(Path(path), text, mode=0o600)
            for part, part_argv in engine.companions(launch):  # started first: the engine waits for them
                ranks.append(Rank(instance=inst.name, rank=r, part=part, argv=part_argv, env=dict(companion_env),
                                  cpus=cpus, log=run.log(rank_key(inst.name, r, part)),
                                  listen=(ip or launch.host, launch.master_port or 0)))
            head = r == 0
            listen = (launch.host, launch.port) if head else None
            if ray and not head and launch.master_port:  # a Ray worker node: its node manager's port, checked free
                listen = (ip or launch.host, ray_backend.ports(launch.master_port, r)["--node-manager-port"])
            ranks.append(Rank(instance=inst.name, rank=r, argv=argv, env=env, cpus=cpus,
                              log=run.log(rank_key(inst.name, r)),
                              loaded_marker=engine.loaded_marker if head else None,
                              health_url=f"http://{launch.host}:{launch.port}{engine.health_path}" if head else None,
                              metrics_url=f"http://{launch.host}:{launch.port}{engine.metrics_path}"
                              if head and engine.metrics_path else None,
                              listen=listen))
    return ranks
