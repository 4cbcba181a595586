"""The placement engine: a pure function from (site, config, node count) to a Plan.

Rules:
- an instance needing k = TP x PP <= devices-per-node devices runs inside one
  node; instances are packed on fixed slots of k contiguous devices, aligned to
  the site's locality domains (sockets/NUMA) whenever that keeps the maximum
  number of instances per node, and bound to the CPU cores of their devices;
- an instance needing more devices spans k / devices-per-node whole nodes
  (k must be a multiple of devices-per-node);
- models get separate nodes unless `pack_models` is set (then small instances
  of different models share nodes, largest first);
- ports: model.port_start + the number of that model's instances already on
  the same host, so ports are unique per host; a model's range is as wide as
  the most instances one host can hold (`assign_ports`), so 120,000 TP-1
  instances on 12-tile nodes need 12 ports, not 120,000;
- cost: O(instances): a node that cannot take an instance of k devices is never
  asked again for k (free devices only shrink).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from aegis.config.schema import Config, ModelSpec
from aegis.config.sites import Site, format_ranges
from aegis.errors import AegisError, PlacementError

PLAN_VERSION = 1


class PlanFileError(AegisError):
    """plan.json is missing, damaged or of another version (exit 1)."""


@dataclass(slots=True)
class NodeSlice:
    """The part of an instance that runs on one node."""

    node: int  # index into the allocation's node list
    devices: list[str]  # in the site's own naming
    cpus: str  # cores, as ranges ("1-51"); "" when the site gives no CPU map
    env: dict[str, str]  # the device-visibility variable(s)
    device_indices: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        """As in plan.json (device indices stay in memory)."""
        return {"node": self.node, "devices": self.devices, "cpus": self.cpus, "env": self.env}


@dataclass(slots=True)
class Instance:
    """One engine server (one endpoint)."""

    name: str
    model: str
    model_name: str
    index: int
    port: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    engine: str
    placement: list[NodeSlice]

    @property
    def head(self) -> NodeSlice:
        return self.placement[0]

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "model_name": self.model_name, "index": self.index,
                "port": self.port, "tensor_parallel_size": self.tensor_parallel_size,
                "pipeline_parallel_size": self.pipeline_parallel_size, "engine": self.engine,
                "placement": [p.to_dict() for p in self.placement]}

    @property
    def nodes(self) -> list[int]:
        return [p.node for p in self.placement]


@dataclass
class Plan:
    """Where every instance of every model runs."""

    site: str
    scheduler: str
    devices_per_node: int
    nodes_required: int
    nodes_allocated: int | None
    instances: list[Instance]

    def _header(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "site": self.site, "scheduler": self.scheduler,
                "devices_per_node": self.devices_per_node, "nodes_required": self.nodes_required,
                "nodes_allocated": self.nodes_allocated}

    def to_dict(self) -> dict:
        return {**self._header(), "instances": [i.to_dict() for i in self.instances]}

    def to_json(self) -> str:
        """plan.json: compact, one instance per line (120,000 instances: ~30 MB, readable with grep)."""
        encode = json.JSONEncoder(separators=(",", ":")).encode
        head = encode(self._header())[:-1]
        body = ",\n".join(encode(i.to_dict()) for i in self.instances)
        return f'{head},"instances":[\n{body}\n]}}\n'

    @classmethod
    def from_dict(cls, doc: dict) -> Plan:
        """The inverse of to_dict (device indices are not kept in plan.json)."""
        version = doc.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanFileError(f"plan version {version}; this aegis reads version {PLAN_VERSION}: "
                                "use the aegis that wrote it, or submit the run again")
        instances = [Instance(**{**i, "placement": [NodeSlice(**s) for s in i["placement"]]})
                     for i in doc["instances"]]
        return cls(site=doc["site"], scheduler=doc["scheduler"], devices_per_node=doc["devices_per_node"],
                   nodes_required=doc["nodes_required"], nodes_allocated=doc["nodes_allocated"],
                   instances=instances)

    @classmethod
    def read(cls, path) -> Plan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except PlanFileError as exc:
            raise PlanFileError(f"{path}: {exc}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PlanFileError(f"{path}: cannot read the plan ({type(exc).__name__}: {exc})") from None


@cache
def _slots(n: int, k: int, domains: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Fixed device slots of size k on an n-device node, domain-aligned when that loses nothing."""
    best = n // k
    aligned = tuple(tuple(dom[i * k:(i + 1) * k]) for dom in domains for i in range(len(dom) // k))
    if len(aligned) == best:
        return aligned
    return tuple(tuple(range(i * k, (i + 1) * k)) for i in range(best))


AUTO_PORT_STEP = 100  # a model without port_start starts at the next multiple of this after the previous one


def per_host(spec: ModelSpec, devices_per_node: int) -> int:
    """The most instances of `spec` one host can run (the width of its port range)."""
    k = spec.devices_per_instance
    return 1 if k > devices_per_node else min(spec.instances, devices_per_node // k)


def assign_ports(cfg: Config, devices_per_node: int) -> dict[str, int]:
    """model name -> first port; PlacementError when a range passes 65535 or two ranges overlap.

    A model without port_start continues after the previous one (in steps of AUTO_PORT_STEP).
    """
    starts: dict[str, int] = {}
    ranges: list[tuple[str, int, int]] = []
    next_start = cfg.port_start
    for spec in cfg.models:
        width = per_host(spec, devices_per_node)
        start = spec.port_start if spec.port_start is not None else next_start
        end = start + width - 1
        if end > 65535:
            raise PlacementError(f"model {spec.short_name!r}: ports {start}-{end} go past 65535 (up to {width} "
                                 f"instance(s) per node); lower port_start")
        for other, o_start, o_end in ranges:
            if start <= o_end and o_start <= end:
                raise PlacementError(f"port ranges overlap: {other!r} uses {o_start}-{o_end} and "
                                     f"{spec.short_name!r} uses {start}-{end}; set a distinct port_start")
        ranges.append((spec.short_name, start, end))
        starts[spec.short_name] = start
        next_start = max(next_start, start + AUTO_PORT_STEP * (1 + (width - 1) // AUTO_PORT_STEP))
    return starts


class _Node:
    def __init__(self, n: int):
        self.free = set(range(n))
        self.ports: dict[str, int] = {}

    def next_port(self, model: str, start: int) -> int:
        count = self.ports.get(model, 0)
        self.ports[model] = count + 1
        return start + count


class _Packer:
    def __init__(self, site: Site):
        self.site = site
        self.n = site.device_count
        self.domains = tuple(tuple(d) for d in site.domain_list())
        self.nodes: list[_Node] = []
        self._slot_cache: dict[tuple[int, ...], tuple[list[str], str, dict[str, str]]] = {}

    def new_node(self) -> int:
        self.nodes.append(_Node(self.n))
        return len(self.nodes) - 1

    def find(self, node: _Node, k: int) -> tuple[int, ...] | None:
        for slot in _slots(self.n, k, self.domains):
            if node.free.issuperset(slot):
                return slot
        # Mixed sizes (pack_models) can leave free runs off the fixed slots.
        run: list[int] = []
        for dev in range(self.n):
            run = run + [dev] if dev in node.free else []
            if len(run) == k:
                return tuple(run)
        return None

    def slice(self, node: int, devs) -> NodeSlice:
        devs = tuple(devs)
        self.nodes[node].free.difference_update(devs)
        names, cpus, env = self.slot_contents(devs)
        return NodeSlice(node=node, devices=list(names), cpus=cpus, env=dict(env), device_indices=list(devs))

    def slot_contents(self, devs: tuple[int, ...]) -> tuple[list[str], str, dict[str, str]]:
        """Device names, CPU cores and visibility env of a device set: the same on every node (computed once)."""
        if devs not in self._slot_cache:
            names = [self.site.device_name(d) for d in devs]
            cpus: list[int] = []
            for d in devs:
                cpus.extend(self.site.cpus_of_device(d))
            env = {var: sep.join(names) for var, sep in self.site.visibility_env.items()}
            self._slot_cache[devs] = (names, format_ranges(cpus), env)
        return self._slot_cache[devs]


def check_fits(site: Site, spec: ModelSpec) -> None:
    """Reject a model whose TP x PP cannot be laid out on this site's nodes."""
    n, k = site.device_count, spec.devices_per_instance
    if k > n and k % n:
        raise PlacementError(
            f"model {spec.short_name!r}: tensor_parallel_size x pipeline_parallel_size = "
            f"{spec.tensor_parallel_size} x {spec.pipeline_parallel_size} = {k} devices cannot be split "
            f"evenly over nodes of {n} devices (site {site.name}); use at most {n} or a multiple of {n}")


def make_plan(site: Site, cfg: Config, nodes: int | None = None) -> Plan:
    """Place every instance of every model; `nodes` is the allocation size, or None for 'as needed'."""
    site = site.resolved()
    for spec in cfg.models:
        check_fits(site, spec)
    packer = _Packer(site)
    n = site.device_count
    starts = assign_ports(cfg, n)
    names = {id(spec): spec.short_name for spec in cfg.models}  # computed once, not per instance
    placed: list[tuple[int, int, Instance]] = []  # (model order, index, instance)

    def place_spanning(order: int, spec: ModelSpec):
        span = spec.devices_per_instance // n
        for i in range(spec.instances):
            first = len(packer.nodes)
            slices = [packer.slice(packer.new_node(), range(n)) for _ in range(span)]
            name = names[id(spec)]
            port = packer.nodes[first].next_port(name, starts[name])
            placed.append((order, i, _instance(spec, name, i, port, slices)))

    def place_small(order: int, spec: ModelSpec, index: int, candidates: list[int], skip: dict[int, int]):
        """First fit over `candidates`; skip[k]: how many leading candidates are known full for k devices."""
        k = spec.devices_per_instance
        i = skip.get(k, 0)
        slot = None
        while i < len(candidates):
            slot = packer.find(packer.nodes[candidates[i]], k)
            if slot is not None:
                break
            i += 1  # full for k now, and free devices only shrink: never asked for k again
        skip[k] = i
        if slot is None:
            candidates.append(packer.new_node())
            slot = packer.find(packer.nodes[candidates[i]], k)
        node = candidates[i]
        assert slot is not None  # an empty node holds any k <= n
        name = names[id(spec)]
        port = packer.nodes[node].next_port(name, starts[name])
        placed.append((order, index, _instance(spec, name, index, port, [packer.slice(node, slot)])))

    def place_own(order: int, spec: ModelSpec):
        """A model on nodes of its own: fill each node's fixed slots in order (what first fit does
        when every instance has the same size), computed instead of searched."""
        slots = _slots(n, spec.devices_per_instance, packer.domains)
        per = len(slots)
        name = names[id(spec)]
        start = starts[name]
        contents = [packer.slot_contents(s) for s in slots]
        node = -1
        for i in range(spec.instances):
            j = i % per
            if j == 0:
                node = packer.new_node()
                packer.nodes[node].free.clear()  # filled in this loop; nothing else places on a model's own nodes
            devices, cpus, env = contents[j]
            placed.append((order, i, _instance(spec, name, i, start + j, [NodeSlice(
                node=node, devices=list(devices), cpus=cpus, env=dict(env), device_indices=list(slots[j]))])))

    if cfg.pack_models:
        for order, spec in enumerate(cfg.models):
            if spec.devices_per_instance > n:
                place_spanning(order, spec)
        shared: list[int] = []
        shared_skip: dict[int, int] = {}
        small = [(o, s) for o, s in enumerate(cfg.models) if s.devices_per_instance <= n]
        for order, spec in sorted(small, key=lambda os_: -os_[1].devices_per_instance):
            for i in range(spec.instances):
                place_small(order, spec, i, shared, shared_skip)
    else:
        for order, spec in enumerate(cfg.models):
            if spec.devices_per_instance > n:
                place_spanning(order, spec)
            else:
                place_own(order, spec)

    required = len(packer.nodes)
    if site.max_nodes is not None and required > site.max_nodes:
        raise PlacementError(
            f"the plan needs {required} nodes but site {site.name} has {site.max_nodes} "
            f"({n} {site.device_kind} devices each); lower instances or tensor_parallel_size")
    if nodes is not None and nodes < required:
        raise PlacementError(
            f"the plan needs {required} nodes but only {nodes} are available; "
            f"request {required} nodes or lower instances/tensor_parallel_size")
    placed.sort(key=lambda t: (t[0], t[1]))
    return Plan(site=site.name, scheduler=site.scheduler, devices_per_node=n, nodes_required=required,
                nodes_allocated=nodes, instances=[p[2] for p in placed])


def _instance(spec: ModelSpec, name: str, index: int, port: int, slices: list[NodeSlice]) -> Instance:
    return Instance(
        name=f"{name}-{index}", model=spec.model, model_name=name, index=index,
        port=port, tensor_parallel_size=spec.tensor_parallel_size,
        pipeline_parallel_size=spec.pipeline_parallel_size, engine=spec.engine, placement=slices)


def format_table(plan: Plan) -> str:
    """A human-readable view of the plan."""
    head = (f"site {plan.site} ({plan.scheduler}), {plan.devices_per_node} devices per node, "
            f"{plan.nodes_required} node{'s' if plan.nodes_required != 1 else ''} required, "
            f"{len(plan.instances)} instance{'s' if len(plan.instances) != 1 else ''}")
    if plan.nodes_allocated is not None and plan.nodes_allocated > plan.nodes_required:
        head += f" ({plan.nodes_allocated - plan.nodes_required} of {plan.nodes_allocated} nodes unused)"
    rows = [("INSTANCE", "MODEL", "TPxPP", "NODE", "DEVICES", "CPUS", "PORT")]
    for inst in plan.instances:
        for j, p in enumerate(inst.placement):
            first = j == 0
            rows.append((
                inst.name if first else "",
                inst.model if first else "",
                f"{inst.tensor_parallel_size}x{inst.pipeline_parallel_size}" if first else "",
                str(p.node),
                ",".join(p.devices),
                p.cpus or "-",
                str(inst.port) if first else "",
            ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
