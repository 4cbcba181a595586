"""Property tests (hypothesis) of the placement engine over every shipped site."""
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegis.config.schema import resolve
from aegis.config.sites import load_site
from aegis.engines.ray import PORTS as RAY_PORTS
from aegis.errors import PlacementError
from aegis.plan.placement import make_plan

SITES = {name: load_site(name).resolved() for name in ("aurora", "frontier", "h200", "polaris", "local")}


@st.composite
def scenarios(draw):
    site = SITES[draw(st.sampled_from(sorted(SITES)))]
    n = site.devices_per_node
    models = []
    for i in range(draw(st.integers(1, 3))):
        tp = draw(st.integers(1, 2 * n))
        pp = draw(st.sampled_from([1, 1, 2]))
        model = {"model": f"org/m{i}", "instances": draw(st.integers(1, 12)),
                 "tensor_parallel_size": tp, "pipeline_parallel_size": pp}
        if draw(st.booleans()):  # else the port after the previous model's (past a Ray cluster's block)
            model["port_start"] = 8000 + 1000 * i  # a Ray cluster takes 527 ports from port + 20000
        models.append(model)
    return site, {"models": models, "pack_models": draw(st.booleans())}


def nodes_of_one(k, n):
    """Nodes of an instance of k > n devices: the fewest that take an equal share each."""
    return min(s for s in range(1, k + 1) if k % s == 0 and k // s <= n)


def expected_unpacked(n, models):
    total = 0
    for m in models:
        k = m["tensor_parallel_size"] * m["pipeline_parallel_size"]
        total += m["instances"] * nodes_of_one(k, n) if k > n else math.ceil(m["instances"] / (n // k))
    return total


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_placement_invariants(scenario):
    site, raw = scenario
    n = site.devices_per_node
    cfg = resolve(raw)
    if site.max_nodes:
        cfg = cfg.model_copy(update={"models": cfg.models[:1]})
    try:
        plan = make_plan(site, cfg)
    except PlacementError as exc:
        msg = str(exc)
        assert "cannot be split evenly" in msg or (site.max_nodes and "site local has" in msg)
        return
    used = set()
    ports = set()
    taken: dict[int, list[tuple[int, int, str]]] = {}  # node -> ports its instances take there (serving, Ray)
    for inst in plan.instances:
        k = inst.tensor_parallel_size * inst.pipeline_parallel_size
        assert sum(len(p.device_indices) for p in inst.placement) == k  # exactly TP x PP devices
        for p in inst.placement:
            assert 0 <= p.node < plan.nodes_required
            for d in p.device_indices:
                assert (p.node, d) not in used  # no device used twice on a node
                used.add((p.node, d))
        assert (inst.head.node, inst.port) not in ports  # ports unique per host
        ports.add((inst.head.node, inst.port))
        taken.setdefault(inst.head.node, []).append((inst.port, inst.port, inst.name))
        assert bool(inst.ray_ports) == (k > n and site.multinode_backends.get("vllm") == "ray")
        if inst.ray_ports:  # a Ray cluster's block, on every node of the instance
            low, high = map(int, inst.ray_ports.split("-"))
            assert low == inst.port + 20000 and high - low + 1 == RAY_PORTS
            for p in inst.placement:
                taken.setdefault(p.node, []).append((low, high, inst.name))
        if k <= n:
            assert len(inst.placement) == 1  # never straddles nodes
    for node, spans in taken.items():  # no port of a host wanted twice (serving ports and Ray clusters' blocks)
        spans.sort()
        for (_, high, a), (low, _, b) in zip(spans, spans[1:]):
            assert high < low, f"node {node}: {a} and {b} want the same ports"
    models = [m.model_dump() for m in cfg.models]
    if not cfg.pack_models:
        assert plan.nodes_required == expected_unpacked(n, models)  # minimal
        ref = make_plan(site, cfg, explicit=True)  # the blocks expand to what first fit places one by one
        assert list(plan.instances) == list(ref.instances)
        for node in range(plan.nodes_required):
            assert plan.instances_on(node) == [i for i in ref.instances if node in i.nodes]
    else:
        small = sorted({m["tensor_parallel_size"] * m["pipeline_parallel_size"] for m in models
                        if m["tensor_parallel_size"] * m["pipeline_parallel_size"] <= n})
        span_nodes = sum(m["instances"] * nodes_of_one(m["tensor_parallel_size"] * m["pipeline_parallel_size"], n)
                         for m in models if m["tensor_parallel_size"] * m["pipeline_parallel_size"] > n)
        small_devices = sum(m["instances"] * m["tensor_parallel_size"] * m["pipeline_parallel_size"]
                            for m in models if m["tensor_parallel_size"] * m["pipeline_parallel_size"] <= n)
        lower = span_nodes + math.ceil(small_devices / n)
        assert plan.nodes_required >= lower
        chain = all(b % a == 0 for a, b in zip(small, small[1:])) and (not small or n % small[-1] == 0)
        if chain:
            assert plan.nodes_required == lower  # sizes that divide each other pack perfectly
