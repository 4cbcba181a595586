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
  the same host, so ports are unique per host.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from aegis.config.schema import Config, ModelSpec
from aegis.config.sites import Site, format_ranges
from aegis.errors import AegisError, PlacementError

PLAN_VERSION = 1


class PlanFileError(AegisError):
    """plan.json is missing, damaged or of another version (exit 1)."""


@dataclass
class NodeSlice:
    """The part of an instance that runs on one node."""

    node: int  # index into the allocation's node list
    devices: list[str]  # in the site's own naming
    cpus: str  # cores, as ranges ("1-51"); "" when the site gives no CPU map
    env: dict[str, str]  # the device-visibility variable(s)
    device_indices: list[int] = field(default_factory=list)


@dataclass
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

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "version": PLAN_VERSION,
            "site": self.site,
            "scheduler": self.scheduler,
            "devices_per_node": self.devices_per_node,
            "nodes_required": self.nodes_required,
            "nodes_allocated": self.nodes_allocated,
            "instances": [],
        }
        for inst in self.instances:
            d = asdict(inst)
            for p in d["placement"]:
                p.pop("device_indices")
            out["instances"].append(d)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

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


class _Node:
    def __init__(self, n: int):
        self.free = set(range(n))
        self.ports: dict[str, int] = {}

    def next_port(self, spec: ModelSpec) -> int:
        count = self.ports.get(spec.short_name, 0)
        self.ports[spec.short_name] = count + 1
        assert spec.port_start is not None  # Config's validation gives every model a port_start
        return spec.port_start + count


class _Packer:
    def __init__(self, site: Site):
        self.site = site
        self.n = site.device_count
        self.domains = tuple(tuple(d) for d in site.domain_list())
        self.nodes: list[_Node] = []

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
        devs = list(devs)
        self.nodes[node].free.difference_update(devs)
        names = [self.site.device_name(d) for d in devs]
        cpus: list[int] = []
        for d in devs:
            cpus.extend(self.site.cpus_of_device(d))
        env = {var: sep.join(names) for var, sep in self.site.visibility_env.items()}
        return NodeSlice(node=node, devices=names, cpus=format_ranges(cpus), env=env, device_indices=devs)


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
    placed: list[tuple[int, int, Instance]] = []  # (model order, index, instance)

    def place_spanning(order: int, spec: ModelSpec):
        span = spec.devices_per_instance // n
        for i in range(spec.instances):
            first = len(packer.nodes)
            slices = [packer.slice(packer.new_node(), range(n)) for _ in range(span)]
            port = packer.nodes[first].next_port(spec)
            placed.append((order, i, _instance(spec, i, port, slices)))

    def place_small(order: int, spec: ModelSpec, index: int, candidates: list[int]):
        k = spec.devices_per_instance
        for node in candidates:
            slot = packer.find(packer.nodes[node], k)
            if slot is not None:
                break
        else:
            node = packer.new_node()
            candidates.append(node)
            slot = packer.find(packer.nodes[node], k)
        port = packer.nodes[node].next_port(spec)
        placed.append((order, index, _instance(spec, index, port, [packer.slice(node, slot)])))

    if cfg.pack_models:
        for order, spec in enumerate(cfg.models):
            if spec.devices_per_instance > n:
                place_spanning(order, spec)
        shared: list[int] = []
        small = [(o, s) for o, s in enumerate(cfg.models) if s.devices_per_instance <= n]
        for order, spec in sorted(small, key=lambda os_: -os_[1].devices_per_instance):
            for i in range(spec.instances):
                place_small(order, spec, i, shared)
    else:
        for order, spec in enumerate(cfg.models):
            if spec.devices_per_instance > n:
                place_spanning(order, spec)
            else:
                own: list[int] = []
                for i in range(spec.instances):
                    place_small(order, spec, i, own)

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


def _instance(spec: ModelSpec, index: int, port: int, slices: list[NodeSlice]) -> Instance:
    return Instance(
        name=f"{spec.short_name}-{index}", model=spec.model, model_name=spec.short_name, index=index,
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
