"""The placement engine: a pure function from (site, config, node count) to a Plan.

Rules:
- an instance needing k = TP x PP <= devices-per-node devices runs inside one
  node; instances are packed on fixed slots of k contiguous devices, aligned to
  the site's locality domains (sockets/NUMA) whenever that keeps the maximum
  number of instances per node, and bound to the CPU cores of their devices;
- an instance needing more devices spans s nodes, the fewest that split k
  evenly (`span`), and uses k / s devices of each (TP 8 x PP 2 on Aurora's
  12-tile nodes: tiles 0-7 of 2 nodes, as ALCF runs Llama-405B); its nodes are
  its own;
- models get separate nodes unless `pack_models` is set (then small instances
  of different models share nodes, largest first);
- ports: model.port_start + the number of that model's instances already on
  the same host, so ports are unique per host; a model's range is as wide as
  the most instances one host can hold (`assign_ports`), so 120,000 TP-1
  instances on 12-tile nodes need 12 ports, not 120,000; an instance that
  spans nodes also takes its rendezvous port (port + 20000) or, over Ray, its
  cluster's block of ports from there (Instance.ray_ports), all disjoint;
- cost: a model on nodes of its own is one Block (its per-node slot pattern,
  repeated over consecutive nodes): O(1) to place, O(nodes) or better to
  write; other instances are placed one by one in O(instances) (a node that
  cannot take an instance of k devices is never asked again for k).

`Plan.instances` is a lazy sequence of Instance objects over the blocks and
the explicit instances, in plan order (models in config order, then index);
`Plan.instances_on(node)` gives one node's instances without the others.
"""
from __future__ import annotations

import bisect
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, overload

from aegis.config.schema import Config, ModelSpec
from aegis.config.sites import Site, format_ranges
from aegis.engines import multinode_backend
from aegis.engines.ray import PORTS as RAY_PORTS
from aegis.errors import AegisError, PlacementError
from aegis.util.ports import RENDEZVOUS_OFFSET, rendezvous_port

PLAN_VERSION = 2
READS_VERSIONS = (1, 2)  # version 1: every instance explicit, no blocks


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
    ray_ports: str = ""  # the ports its Ray cluster takes on each of its nodes ("28000-28526"); "" without Ray

    @property
    def head(self) -> NodeSlice:
        return self.placement[0]

    def to_dict(self) -> dict:
        out = {"name": self.name, "model": self.model, "model_name": self.model_name, "index": self.index,
               "port": self.port, "tensor_parallel_size": self.tensor_parallel_size,
               "pipeline_parallel_size": self.pipeline_parallel_size, "engine": self.engine,
               "placement": [p.to_dict() for p in self.placement]}
        if self.ray_ports:
            out["ray_ports"] = self.ray_ports
        return out

    @property
    def nodes(self) -> list[int]:
        return [p.node for p in self.placement]


@dataclass(frozen=True, slots=True)
class Slot:
    """One place on a node of a Block: its port, devices, CPU cores and visibility env."""

    port: int
    devices: tuple[str, ...]
    cpus: str
    env: dict[str, str]
    device_indices: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"port": self.port, "devices": list(self.devices), "cpus": self.cpus, "env": self.env}

    @classmethod
    def from_dict(cls, d: dict) -> Slot:
        return cls(port=d["port"], devices=tuple(d["devices"]), cpus=d["cpus"], env=dict(d["env"]))


@dataclass(frozen=True, slots=True)
class Block:
    """`count` single-node instances of one model on consecutive nodes, the same slots on each node.

    Instance i (0 <= i < count) is named f"{model_name}-{first_index + i}", runs on node
    first_node + i // len(slots) in slot slots[i % len(slots)]; the last node may be partly
    filled. `position` is where instance 0 stands in the plan's instance order.
    """

    model: str
    model_name: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    engine: str
    position: int
    first_index: int
    count: int
    first_node: int
    slots: tuple[Slot, ...]

    @property
    def per_node(self) -> int:
        return len(self.slots)

    @property
    def node_count(self) -> int:
        return -(-self.count // len(self.slots))

    def instance(self, i: int) -> Instance:
        """The i-th instance of the block (0-based), as a fresh Instance."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        per = len(self.slots)
        s = self.slots[i % per]
        index = self.first_index + i
        return Instance(
            name=f"{self.model_name}-{index}", model=self.model, model_name=self.model_name, index=index,
            port=s.port, tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size, engine=self.engine,
            placement=[NodeSlice(node=self.first_node + i // per, devices=list(s.devices), cpus=s.cpus,
                                 env=dict(s.env), device_indices=list(s.device_indices))])

    def __iter__(self) -> Iterator[Instance]:
        """Every instance of the block in order (node by node; positional arguments: the fast way)."""
        per = len(self.slots)
        name, model, mname, tp, pp, engine = (self.model_name, self.model, self.model_name,
                                              self.tensor_parallel_size, self.pipeline_parallel_size, self.engine)
        index = self.first_index
        for j in range(self.node_count):
            node = self.first_node + j
            for s in self.slots[:min(per, self.count - j * per)]:
                yield Instance(f"{name}-{index}", model, mname, index, s.port, tp, pp, engine,
                               [NodeSlice(node, list(s.devices), s.cpus, dict(s.env), list(s.device_indices))])
                index += 1

    def on_node(self, node: int) -> range:
        """The block-relative indices of its instances on `node` (empty when none)."""
        j = node - self.first_node
        if j < 0 or j >= self.node_count:
            return range(0)
        per = len(self.slots)
        return range(j * per, min(self.count, (j + 1) * per))

    def to_dict(self) -> dict:
        return {"model_name": self.model_name, "model": self.model, "engine": self.engine,
                "tensor_parallel_size": self.tensor_parallel_size,
                "pipeline_parallel_size": self.pipeline_parallel_size, "position": self.position,
                "first_index": self.first_index, "count": self.count, "first_node": self.first_node,
                "slots": [s.to_dict() for s in self.slots]}

    @classmethod
    def from_dict(cls, d: dict) -> Block:
        slots = tuple(Slot.from_dict(s) for s in d["slots"])
        if not slots or d["count"] < 1:
            raise ValueError(f"block {d['model_name']!r} has no slots or no instances")
        return cls(**{**d, "slots": slots})


class Instances(Sequence[Instance]):
    """The plan's instances in order, made from its blocks and explicit instances when asked for."""

    def __init__(self, blocks: Sequence[Block], explicit: Sequence[Instance]):
        self._parts: list[Block | Sequence[Instance]] = []  # runs of explicit instances between blocks
        self._starts: list[int] = []
        pos = used = 0
        for b in sorted(blocks, key=lambda b: b.position):
            gap = b.position - pos
            if gap < 0 or used + gap > len(explicit):
                raise ValueError(f"block {b.model_name!r} at position {b.position} overlaps another "
                                 "or leaves a gap")
            if gap:
                self._add(pos, explicit[used:used + gap])
                used += gap
            self._add(b.position, b)
            pos = b.position + b.count
        if used < len(explicit):
            self._add(pos, explicit[used:])
            pos += len(explicit) - used
        self._len = pos

    def _add(self, start: int, part: Block | Sequence[Instance]) -> None:
        self._parts.append(part)
        self._starts.append(start)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Instance]:
        for part in self._parts:
            yield from part

    @overload
    def __getitem__(self, i: int) -> Instance: ...

    @overload
    def __getitem__(self, i: slice) -> list[Instance]: ...

    def __getitem__(self, i: int | slice) -> Instance | list[Instance]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("plan instance index out of range")
        k = bisect.bisect_right(self._starts, i) - 1
        part = self._parts[k]
        if isinstance(part, Block):
            return part.instance(i - self._starts[k])
        return part[i - self._starts[k]]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{self._len} instances>"

    def parts(self) -> list[Block | Sequence[Instance]]:
        """Blocks and runs of explicit instances, in order (for summaries)."""
        return list(self._parts)


@dataclass
class Plan:
    """Where every instance of every model runs: blocks of identical nodes, and explicit instances."""

    site: str
    scheduler: str
    devices_per_node: int
    nodes_required: int
    nodes_allocated: int | None
    explicit: list[Instance] = field(default_factory=list)  # in plan order, around the blocks
    blocks: list[Block] = field(default_factory=list)
    _instances: Instances | None = field(default=None, init=False, repr=False, compare=False)
    _by_node: dict[int, list[tuple[int, Instance]]] | None = field(default=None, init=False, repr=False,
                                                                   compare=False)

    @property
    def instances(self) -> Instances:
        """Every instance, in order (models in config order, then index); made on demand."""
        if self._instances is None:
            self._instances = Instances(self.blocks, self.explicit)
        return self._instances

    def instances_on(self, node: int) -> list[Instance]:
        """The instances with a part on `node` (an index into the allocation), in plan order.

        O(instances on that node) for blocks; explicit instances are indexed by node once.
        """
        found = [(b.position + i, b.instance(i)) for b in self.blocks for i in b.on_node(node)]
        if self.explicit:
            if self._by_node is None:
                self._by_node = self._index_explicit()
            found.extend(self._by_node.get(node, ()))
            found.sort(key=lambda t: t[0])
        return [inst for _, inst in found]

    def _index_explicit(self) -> dict[int, list[tuple[int, Instance]]]:
        by_node: dict[int, list[tuple[int, Instance]]] = {}
        seq = self.instances
        for start, part in zip(seq._starts, seq._parts):
            if isinstance(part, Block):
                continue
            for pos, inst in enumerate(part, start):
                for node in dict.fromkeys(p.node for p in inst.placement):
                    by_node.setdefault(node, []).append((pos, inst))
        return by_node

    def _header(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "site": self.site, "scheduler": self.scheduler,
                "devices_per_node": self.devices_per_node, "nodes_required": self.nodes_required,
                "nodes_allocated": self.nodes_allocated}

    def expanded(self) -> Plan:
        """The same plan with every instance explicit (no blocks)."""
        return Plan(site=self.site, scheduler=self.scheduler, devices_per_node=self.devices_per_node,
                    nodes_required=self.nodes_required, nodes_allocated=self.nodes_allocated,
                    explicit=list(self.instances))

    def to_dict(self) -> dict:
        return {**self._header(), "blocks": [b.to_dict() for b in self.blocks],
                "instances": [i.to_dict() for i in self.explicit]}

    def to_json(self) -> str:
        """plan.json: compact, one block or instance per line (120,000 TP-1 instances on Aurora: one block)."""
        encode = json.JSONEncoder(separators=(",", ":")).encode
        head = encode(self._header())[:-1]
        blocks = "".join(f"\n{encode(b.to_dict())}," for b in self.blocks)[:-1]
        body = "".join(f"\n{encode(i.to_dict())}," for i in self.explicit)[:-1]
        return f'{head},"blocks":[{blocks}\n],"instances":[{body}\n]}}\n'

    @classmethod
    def from_dict(cls, doc: dict) -> Plan:
        """The inverse of to_dict (device indices are not kept in plan.json); reads versions 1 and 2."""
        version = doc.get("version", PLAN_VERSION)
        if version not in READS_VERSIONS:
            raise PlanFileError(f"plan version {version}; this aegis reads versions "
                                f"{' and '.join(map(str, READS_VERSIONS))}: "
                                "use the aegis that wrote it, or submit the run again")
        explicit = [Instance(**{**i, "placement": [NodeSlice(**s) for s in i["placement"]]})
                    for i in doc["instances"]]
        blocks = [Block.from_dict(b) for b in doc.get("blocks") or []] if version >= 2 else []
        plan = cls(site=doc["site"], scheduler=doc["scheduler"], devices_per_node=doc["devices_per_node"],
                   nodes_required=doc["nodes_required"], nodes_allocated=doc["nodes_allocated"],
                   explicit=explicit, blocks=blocks)
        plan.instances  # noqa: B018 -- checks that blocks and explicit instances tile the order
        return plan

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


def spans(spec: ModelSpec, devices_per_node: int) -> bool:
    """Whether an instance of `spec` spans nodes (and so has a rendezvous port)."""
    return spec.devices_per_instance > devices_per_node


def on_ray(spec: ModelSpec, site: Site | None, devices_per_node: int) -> bool:
    """Whether an instance of `spec` spans nodes over a Ray cluster of its own (aegis.engines.ray)."""
    return site is not None and spans(spec, devices_per_node) and multinode_backend(spec, site) == "ray"


def ray_ports(port: int) -> tuple[int, int]:
    """The first and last port of the Ray cluster of an instance serving on `port` (from its rendezvous port)."""
    first = rendezvous_port(port)
    return first, first + RAY_PORTS - 1


def assign_ports(cfg: Config, devices_per_node: int, site: Site | None = None) -> dict[str, int]:
    """model name -> first port; PlacementError when a range passes 65535, two ranges overlap or one holds the
    gateway's port.

    The ranges are each model's serving ports and, for a model whose instances span nodes, the rendezvous
    port (serving port + 20000) or, over Ray (the site's or model's multinode_backend), its cluster's block
    of RAY_PORTS ports from there. A model without port_start continues after the previous one (in steps of
    AUTO_PORT_STEP, past a Ray cluster's block).
    """
    starts: dict[str, int] = {}
    ranges: list[tuple[str, int, int]] = []
    next_start = cfg.port_start
    for spec in cfg.models:
        name = spec.short_name
        width = per_host(spec, devices_per_node)
        start = spec.port_start if spec.port_start is not None else next_start
        end = start + width - 1
        if end > 65535:
            raise PlacementError(f"model {name!r}: ports {start}-{end} go past 65535 (up to {width} "
                                 f"instance(s) per node); lower port_start")
        mine = [(repr(name), start, end)]
        step = width
        if on_ray(spec, site, devices_per_node):
            first, last = ray_ports(start)
            if last > 65535:
                raise PlacementError(f"model {name!r}: its Ray cluster's ports {first}-{last} ({RAY_PORTS} from "
                                     f"port {start} + {RENDEZVOUS_OFFSET}) go past 65535; lower port_start")
            mine.append((f"{name!r} (its Ray cluster)", first, last))
            step = max(width, RAY_PORTS)
        elif spans(spec, devices_per_node):
            mine.append((f"{name!r} (its rendezvous port)", rendezvous_port(start), rendezvous_port(start)))
        for label, low, high in mine:
            for other, o_start, o_end in ranges:
                if low <= o_end and o_start <= high:
                    raise PlacementError(f"port ranges overlap: {other} uses {o_start}-{o_end} and {label} uses "
                                         f"{low}-{high}; set a distinct port_start")
        ranges.extend(mine)
        starts[name] = start
        next_start = max(next_start, start + AUTO_PORT_STEP * (1 + (step - 1) // AUTO_PORT_STEP))
    if cfg.gateway:
        for other, o_start, o_end in ranges:
            if o_start <= cfg.gateway_port <= o_end:
                raise PlacementError(f"gateway_port {cfg.gateway_port} is in the port range of {other} "
                                     f"({o_start}-{o_end}); set another gateway_port")
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
        self.count = 0  # nodes used so far
        self.nodes: dict[int, _Node] = {}  # the nodes whose free devices are tracked (not those of blocks)
        self._slot_cache: dict[tuple[int, ...], tuple[list[str], str, dict[str, str]]] = {}

    def new_node(self) -> int:
        self.nodes[self.count] = _Node(self.n)
        self.count += 1
        return self.count - 1

    def reserve(self, count: int) -> int:
        """`count` whole nodes for a block (not tracked one by one); returns the first."""
        self.count += count
        return self.count - count

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


def span(devices: int, devices_per_node: int) -> tuple[int, int]:
    """(nodes, devices on each) of an instance larger than a node: the fewest nodes that split it evenly."""
    nodes = -(-devices // devices_per_node)
    while devices % nodes:
        nodes += 1
    return nodes, devices // nodes


def make_plan(site: Site, cfg: Config, nodes: int | None = None, *, explicit: bool = False) -> Plan:
    """Place every instance of every model; `nodes` is the allocation size, or None for 'as needed'.

    A model on nodes of its own becomes one Block; `explicit=True` instead places its instances one
    by one by first fit, as `pack_models` does (the reference the tests hold the blocks to).
    """
    site = site.resolved()
    packer = _Packer(site)
    n = site.device_count
    starts = assign_ports(cfg, n, site)
    names = {id(spec): spec.short_name for spec in cfg.models}  # computed once, not per instance
    placed: list[tuple[int, int, Instance | Block]] = []  # (model order, index, instance or block)

    def place_spanning(order: int, spec: ModelSpec):
        count, per = span(spec.devices_per_instance, n)
        ray = on_ray(spec, site, n)
        devices = _slots(n, per, packer.domains)[0]  # the same devices on each node, domain-aligned if they fit
        for i in range(spec.instances):
            first = packer.count
            slices = [packer.slice(packer.new_node(), devices) for _ in range(count)]
            name = names[id(spec)]
            port = packer.nodes[first].next_port(name, starts[name])
            inst = _instance(spec, name, i, port, slices)
            if ray:
                inst.ray_ports = "{}-{}".format(*ray_ports(port))
            placed.append((order, i, inst))

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
        """A model on nodes of its own: each node's fixed slots filled in order (what first fit does
        when every instance has the same size), recorded as one Block instead of searched."""
        if spec.instances < 1:
            return
        slots = _slots(n, spec.devices_per_instance, packer.domains)
        per = min(len(slots), spec.instances)  # a one-node model uses only the slots it fills
        name = names[id(spec)]
        start = starts[name]
        pattern = []
        for j in range(per):
            devices, cpus, env = packer.slot_contents(slots[j])
            pattern.append(Slot(port=start + j, devices=tuple(devices), cpus=cpus, env=dict(env),
                                device_indices=slots[j]))
        first = packer.reserve(-(-spec.instances // per))
        placed.append((order, 0, Block(
            model=spec.model, model_name=name, tensor_parallel_size=spec.tensor_parallel_size,
            pipeline_parallel_size=spec.pipeline_parallel_size, engine=spec.engine, position=-1,
            first_index=0, count=spec.instances, first_node=first, slots=tuple(pattern))))

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
            elif explicit:
                own: list[int] = []
                own_skip: dict[int, int] = {}
                for i in range(spec.instances):
                    place_small(order, spec, i, own, own_skip)
            else:
                place_own(order, spec)

    required = packer.count
    if site.max_nodes is not None and required > site.max_nodes:
        raise PlacementError(
            f"the plan needs {required} nodes but site {site.name} has {site.max_nodes} "
            f"({n} {site.device_kind} devices each); lower instances or tensor_parallel_size")
    if nodes is not None and nodes < required:
        raise PlacementError(
            f"the plan needs {required} nodes but only {nodes} are available; "
            f"request {required} nodes or lower instances/tensor_parallel_size")
    placed.sort(key=lambda t: (t[0], t[1]))
    blocks: list[Block] = []
    instances: list[Instance] = []
    position = 0
    for _, _, item in placed:
        if isinstance(item, Block):
            blocks.append(replace(item, position=position))
            position += item.count
        else:
            instances.append(item)
            position += 1
    return Plan(site=site.name, scheduler=site.scheduler, devices_per_node=n, nodes_required=required,
                nodes_allocated=nodes, explicit=instances, blocks=blocks)


def _instance(spec: ModelSpec, name: str, index: int, port: int, slices: list[NodeSlice]) -> Instance:
    return Instance(
        name=f"{name}-{index}", model=spec.model, model_name=name, index=index,
        port=port, tensor_parallel_size=spec.tensor_parallel_size,
        pipeline_parallel_size=spec.pipeline_parallel_size, engine=spec.engine, placement=slices)


TABLE_BLOCK_ROWS = 64  # a block of more instances (on more than one node) is summarised in the table


def format_table(plan: Plan, every: bool = False) -> str:
    """A human-readable view of the plan.

    A block of more than TABLE_BLOCK_ROWS instances on more than one node shows its first node's
    instances and one row for the rest (the same slots on each of its other nodes); `every` lists
    every instance instead.
    """
    head = (f"site {plan.site} ({plan.scheduler}), {plan.devices_per_node} devices per node, "
            f"{plan.nodes_required} node{'s' if plan.nodes_required != 1 else ''} required, "
            f"{len(plan.instances)} instance{'s' if len(plan.instances) != 1 else ''}")
    if plan.nodes_allocated is not None and plan.nodes_allocated > plan.nodes_required:
        head += f" ({plan.nodes_allocated - plan.nodes_required} of {plan.nodes_allocated} nodes unused)"
    rows = [("INSTANCE", "MODEL", "TPxPP", "NODE", "DEVICES", "CPUS", "PORT")]

    def add(inst: Instance) -> None:
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

    summarised = False
    for part in plan.instances.parts():
        if not isinstance(part, Block):
            for inst in part:
                add(inst)
            continue
        per = part.per_node
        shown = part.count if every or part.node_count == 1 or part.count <= TABLE_BLOCK_ROWS else per
        for i in range(shown):
            add(part.instance(i))
        if shown < part.count:
            summarised = True
            last_node = part.first_node + part.node_count - 1
            ports = sorted(s.port for s in part.slots)
            rows.append((
                f"{part.model_name}-{part.first_index + per}..{part.first_index + part.count - 1}",
                part.model, f"{part.tensor_parallel_size}x{part.pipeline_parallel_size}",
                f"{part.first_node + 1}" + (f"-{last_node}" if last_node > part.first_node + 1 else ""),
                f"as on node {part.first_node}", "", f"{ports[0]}-{ports[-1]}" if len(ports) > 1 else str(ports[0]),
            ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if summarised:
        lines += ["", "A row with a range of instances: the same devices, CPU cores and ports on each of its nodes "
                      "(the last may be partly filled); --all lists every instance."]
    return "\n".join(lines)
