"""Table-driven placement tests for every shipped site."""
import pytest

from aegis.config.schema import resolve
from aegis.config.sites import load_site
from aegis.errors import PlacementError
from aegis.plan.placement import make_plan


def plan_for(site, instances=1, tp=1, pp=1, nodes=None, **extra):
    cfg = resolve({"model": "org/Model-X", "instances": instances, "tensor_parallel_size": tp,
                   "pipeline_parallel_size": pp, **extra})
    return make_plan(load_site(site), cfg, nodes)


# site, tp, pp, instances, nodes_required, per-node count, first instance's devices, its cpus, its env
CASES = [
    ("aurora", 1, 1, 24, 2, 12, ["0"], "1-8", {"ZE_AFFINITY_MASK": "0"}),
    ("aurora", 2, 1, 12, 2, 6, ["0", "1"], "1-16", {"ZE_AFFINITY_MASK": "0,1"}),
    ("aurora", 3, 1, 8, 2, 4, ["0", "1", "2"], "1-24", {"ZE_AFFINITY_MASK": "0,1,2"}),
    ("aurora", 4, 1, 6, 2, 3, ["0", "1", "2", "3"], "1-32", {"ZE_AFFINITY_MASK": "0,1,2,3"}),
    ("aurora", 6, 1, 4, 2, 2, [str(i) for i in range(6)], "1-48", {"ZE_AFFINITY_MASK": "0,1,2,3,4,5"}),
    ("aurora", 8, 1, 3, 3, 1, [str(i) for i in range(8)], "1-48,53-68",
     {"ZE_AFFINITY_MASK": "0,1,2,3,4,5,6,7"}),
    ("aurora", 12, 1, 2, 2, 1, [str(i) for i in range(12)], "1-48,53-100",
     {"ZE_AFFINITY_MASK": ",".join(str(i) for i in range(12))}),
    ("frontier", 1, 1, 16, 2, 8, ["0"], "49-55", {"ROCR_VISIBLE_DEVICES": "0"}),
    ("frontier", 2, 1, 8, 2, 4, ["0", "1"], "49-55,57-63", {"ROCR_VISIBLE_DEVICES": "0,1"}),
    ("frontier", 4, 1, 4, 2, 2, ["0", "1", "2", "3"], "17-23,25-31,49-55,57-63",
     {"ROCR_VISIBLE_DEVICES": "0,1,2,3"}),
    ("frontier", 8, 1, 2, 2, 1, [str(i) for i in range(8)], "1-7,9-15,17-23,25-31,33-39,41-47,49-55,57-63",
     {"ROCR_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}),
    ("h200", 1, 1, 8, 1, 8, ["0"], "0-13", {"CUDA_VISIBLE_DEVICES": "0"}),
    ("h200", 2, 1, 8, 2, 4, ["0", "1"], "0-27", {"CUDA_VISIBLE_DEVICES": "0,1"}),
    ("h200", 4, 1, 4, 2, 2, ["0", "1", "2", "3"], "0-55", {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}),
    ("h200", 8, 1, 2, 2, 1, [str(i) for i in range(8)], "0-111",
     {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}),
    ("polaris", 1, 1, 4, 1, 4, ["0"], "24-31", {"CUDA_VISIBLE_DEVICES": "0"}),
    ("polaris", 2, 1, 4, 2, 2, ["0", "1"], "16-31", {"CUDA_VISIBLE_DEVICES": "0,1"}),
]


@pytest.mark.parametrize("site,tp,pp,instances,nodes,per_node,devices,cpus,env", CASES,
                         ids=[f"{c[0]}-tp{c[1]}-x{c[3]}" for c in CASES])
def test_single_node_instances(site, tp, pp, instances, nodes, per_node, devices, cpus, env):
    plan = plan_for(site, instances, tp, pp)
    assert plan.nodes_required == nodes
    first = plan.instances[0].placement
    assert len(first) == 1
    assert first[0].devices == devices
    assert first[0].cpus == cpus
    assert first[0].env == env
    on_node0 = [i for i in plan.instances if i.head.node == 0]
    assert len(on_node0) == per_node
    # Ports count up per host and restart on the next node.
    assert [i.port for i in on_node0] == list(range(8000, 8000 + per_node))
    if nodes > 1:
        assert [i for i in plan.instances if i.head.node == 1][0].port == 8000


def test_aurora_tp8_three_instances_need_three_nodes():
    plan = plan_for("aurora", 3, 8)
    assert plan.nodes_required == 3
    assert [i.head.node for i in plan.instances] == [0, 1, 2]


def test_aurora_tp3_stays_inside_sockets():
    plan = plan_for("aurora", 4, 3)
    assert [i.head.devices for i in plan.instances] == [
        ["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"], ["9", "10", "11"]]
    assert [i.head.cpus for i in plan.instances] == ["1-24", "25-48", "53-76", "77-100"]  # ALCF: 8 cores per tile


def test_aurora_tp5_prefers_one_socket_per_instance():
    plan = plan_for("aurora", 2, 5)
    assert plan.nodes_required == 1
    assert [i.head.devices for i in plan.instances] == [
        ["0", "1", "2", "3", "4"], ["6", "7", "8", "9", "10"]]


def test_aurora_tp4_packs_three_per_node_across_sockets():
    plan = plan_for("aurora", 3, 4)
    assert plan.nodes_required == 1
    assert plan.instances[1].head.devices == ["4", "5", "6", "7"]
    assert plan.instances[1].head.cpus == "33-48,53-68"


@pytest.mark.parametrize("site,tp,pp,span", [
    ("aurora", 24, 1, 2), ("aurora", 12, 2, 2), ("frontier", 16, 1, 2),
    ("h200", 8, 2, 2), ("h200", 8, 8, 8), ("polaris", 4, 4, 4),
])
def test_spanning_instances_take_whole_nodes(site, tp, pp, span):
    plan = plan_for(site, 2, tp, pp)
    assert plan.nodes_required == 2 * span
    first, second = plan.instances
    assert first.nodes == list(range(span))
    assert second.nodes == list(range(span, 2 * span))
    n = plan.devices_per_node
    for inst in plan.instances:
        assert sum(len(p.devices) for p in inst.placement) == tp * pp
        assert all(len(p.devices) == n for p in inst.placement)
        assert inst.port == 8000


def test_h200_64_gpu_single_instance():
    plan = plan_for("h200", 1, 8, 8)
    assert plan.nodes_required == 8
    (inst,) = plan.instances
    assert len(inst.placement) == 8
    assert all(p.env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"} for p in inst.placement)


@pytest.mark.parametrize("site,tp,pp,nodes,per_node", [
    ("aurora", 8, 2, 2, 8),     # ALCF's Llama-405B recipe: TP 8 x PP 2, 8 tiles on each of 2 nodes
    ("aurora", 16, 1, 2, 8), ("aurora", 7, 2, 2, 7), ("aurora", 12, 2, 2, 12), ("aurora", 13, 1, 13, 1),
    ("frontier", 12, 1, 2, 6), ("h200", 6, 2, 2, 6), ("polaris", 6, 1, 2, 3), ("polaris", 4, 2, 2, 4)])
def test_instance_larger_than_a_node_takes_an_equal_share_of_the_fewest_nodes(site, tp, pp, nodes, per_node):
    """vLLM runs world_size / nnodes ranks on each node (docs/serving/parallelism_scaling.md); the same
    devices on each node, its nodes its own."""
    plan = plan_for(site, 2, tp, pp)
    assert plan.nodes_required == 2 * nodes
    for inst in plan.instances:
        assert len(inst.placement) == nodes
        assert all(len(p.devices) == per_node for p in inst.placement)
        assert len({tuple(p.devices) for p in inst.placement}) == 1


def test_mixed_models_get_separate_nodes_by_default():
    cfg = resolve({"models": [
        {"model": "meta-llama/Llama-3.3-70B-Instruct", "name": "llama-70b", "instances": 4,
         "tensor_parallel_size": 6},
        {"model": "meta-llama/Llama-3.1-8B-Instruct", "name": "llama-8b", "instances": 8},
        {"model": "mistralai/Mixtral-8x7B", "name": "mixtral", "instances": 2, "tensor_parallel_size": 2,
         "port_start": 8200},
    ]})
    plan = make_plan(load_site("aurora"), cfg)
    by_model = {}
    for inst in plan.instances:
        by_model.setdefault(inst.model_name, set()).add(inst.head.node)
    assert by_model == {"llama-70b": {0, 1}, "llama-8b": {2}, "mixtral": {3}}
    assert plan.nodes_required == 4
    ports = {i.name: i.port for i in plan.instances}
    assert ports["llama-70b-0"] == 8000 and ports["llama-70b-1"] == 8001 and ports["llama-70b-2"] == 8000
    assert ports["llama-8b-0"] == 8100 and ports["llama-8b-7"] == 8107
    assert ports["mixtral-0"] == 8200 and ports["mixtral-1"] == 8201


def test_pack_models_shares_nodes():
    cfg = resolve({"pack_models": True, "models": [
        {"model": "a/big", "instances": 1, "tensor_parallel_size": 8},
        {"model": "b/small", "instances": 4, "tensor_parallel_size": 1},
    ]})
    plan = make_plan(load_site("aurora"), cfg)
    assert plan.nodes_required == 1
    small = [i for i in plan.instances if i.model_name == "small"]
    assert [i.head.devices for i in small] == [["8"], ["9"], ["10"], ["11"]]
    assert [i.port for i in small] == [8100, 8101, 8102, 8103]


def test_given_nodes_too_few_is_an_error():
    with pytest.raises(PlacementError, match="needs 3 nodes but only 2"):
        plan_for("aurora", 3, 8, nodes=2)


def test_local_site_is_one_node():
    site = load_site("local").resolved()
    cores = site.devices_per_node
    plan = make_plan(site, resolve({"model": "m", "instances": cores}))
    assert plan.nodes_required == 1
    assert plan.instances[0].head.env == {"VLLM_CPU_OMP_THREADS_BIND": site.device_name(0)}
    with pytest.raises(PlacementError, match="site local has 1"):
        make_plan(site, resolve({"model": "m", "instances": cores + 1}))


def test_local_tp2_binds_one_core_per_rank():
    site = load_site("local").resolved()
    if site.devices_per_node < 2:
        pytest.skip("needs 2 cores")  # this machine and CI have 2
    plan = make_plan(site, resolve({"model": "m", "tensor_parallel_size": 2}))
    assert plan.instances[0].head.env == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def test_plan_json_shape():
    plan = plan_for("aurora", 2, 6)
    doc = plan.to_dict()
    assert doc["version"] == 2 and doc["instances"] == []  # a model on its own nodes is one block
    assert doc["site"] == "aurora" and doc["scheduler"] == "pbs" and doc["nodes_required"] == 1
    (block,) = doc["blocks"]
    assert {"model_name", "model", "engine", "tensor_parallel_size", "pipeline_parallel_size", "position",
            "first_index", "count", "first_node", "slots"} <= set(block)
    assert block["slots"][0] == {"port": 8000, "devices": ["0", "1", "2", "3", "4", "5"], "cpus": "1-48",
                                 "env": {"ZE_AFFINITY_MASK": "0,1,2,3,4,5"}}
    inst = plan.expanded().to_dict()["instances"][0]  # `aegis plan --json --all`: every instance explicit
    assert {"name", "model", "port", "tensor_parallel_size", "pipeline_parallel_size", "placement"} <= set(inst)
    assert inst["placement"] == [{"node": 0, "devices": ["0", "1", "2", "3", "4", "5"], "cpus": "1-48",
                                  "env": {"ZE_AFFINITY_MASK": "0,1,2,3,4,5"}}]


def test_ports_are_per_host_at_scale():
    """120,000 TP-1 instances on Aurora (12 tiles a node) use ports 8000-8011 on every node; a second
    model without port_start starts at the next hundred after that, not after 120,000 ports."""
    site = load_site("aurora")
    cfg = resolve({"models": [{"model": "m/big", "instances": 120_000}, {"model": "m/small", "instances": 24}]})
    plan = make_plan(site, cfg)
    assert plan.nodes_required == 10_002
    big = [i for i in plan.instances if i.model_name == "big"]
    assert {i.port for i in big} == set(range(8000, 8012))
    assert len({(i.head.node, i.port) for i in big}) == 120_000  # unique per host
    assert {i.port for i in plan.instances if i.model_name == "small"} == set(range(8100, 8112))
    ok = make_plan(site, resolve({"model": "m/x", "instances": 30, "port_start": 65524}))
    assert max(i.port for i in ok.instances) == 65535
    with pytest.raises(PlacementError, match="ports 65525-65536 go past 65535"):
        make_plan(site, resolve({"model": "m/x", "instances": 30, "port_start": 65525}))
