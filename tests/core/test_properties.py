"""Property tests (hypothesis) of the placement engine over every shipped site."""
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegis.config.schema import resolve
from aegis.config.sites import load_site
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
        models.append({"model": f"org/m{i}", "instances": draw(st.integers(1, 12)),
                       "tensor_parallel_size": tp, "pipeline_parallel_size": pp,
                       "port_start": 8000 + 100 * i})
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
        if k <= n:
            assert len(inst.placement) == 1  # never straddles nodes
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
