"""The block form of a plan: the same instances as placing them one by one, found per node, in plan.json."""
import json

import pytest

from aegis.config.schema import resolve
from aegis.config.sites import load_site
from aegis.errors import AegisError
from aegis.plan.placement import Plan, PlanFileError, format_table, make_plan
from tests.core.helpers import run_cli, write
from tests.core.test_placement import CASES

SITES = ("aurora", "frontier", "h200", "polaris", "local")


def both(site, raw, nodes=None):
    """(block plan, the same config placed instance by instance by first fit)."""
    cfg = resolve(raw)
    site = load_site(site)
    return make_plan(site, cfg, nodes), make_plan(site, cfg, nodes, explicit=True)


def flat(plan):
    """Everything a consumer reads of each instance (plan.json's fields and the device indices)."""
    return [(i.to_dict(), [p.device_indices for p in i.placement]) for i in plan.instances]


@pytest.mark.parametrize("site,tp,pp,instances", [(c[0], c[1], c[2], c[3]) for c in CASES]
                         + [("aurora", 1, 1, 25), ("aurora", 5, 1, 7), ("aurora", 4, 1, 1),
                            ("frontier", 2, 1, 9), ("h200", 3, 1, 5), ("polaris", 3, 1, 3)],
                         ids=lambda v: str(v))
def test_blocks_expand_to_the_instances_first_fit_places(site, tp, pp, instances):
    blocks, ref = both(site, {"model": "org/Model-X", "instances": instances, "tensor_parallel_size": tp,
                              "pipeline_parallel_size": pp})
    assert len(blocks.blocks) == 1 and blocks.explicit == [] and ref.blocks == []
    assert blocks.nodes_required == ref.nodes_required
    assert flat(blocks) == flat(ref)
    for node in range(blocks.nodes_required):
        assert blocks.instances_on(node) == ref.instances_on(node) != []


@pytest.mark.parametrize("site", SITES)
def test_mixed_models_blocks_and_spanning_instances(site):
    n = load_site(site).resolved().devices_per_node
    models = [{"model": "a/small", "instances": 2 * n + 1},
              {"model": "b/half", "instances": 3, "tensor_parallel_size": max(1, n // 2), "port_start": 8200},
              {"model": "c/whole", "instances": 2, "tensor_parallel_size": n, "pipeline_parallel_size": 2,
               "port_start": 8300},
              {"model": "d/one", "instances": 1, "port_start": 8400}]
    if site == "local":  # one node: a model of its own only
        models = models[:1]
        models[0]["instances"] = n
    blocks, ref = both(site, {"models": models})
    assert flat(blocks) == flat(ref)
    assert blocks.nodes_required == ref.nodes_required
    for node in range(blocks.nodes_required + 1):
        want = [i for i in ref.instances if node in i.nodes]
        assert blocks.instances_on(node) == ref.instances_on(node) == want
    back = Plan.from_dict(json.loads(blocks.to_json()))
    assert [i.to_dict() for i in back.instances] == [i.to_dict() for i in blocks.instances]
    assert [i.to_dict() for i in back.instances_on(1)] == [i.to_dict() for i in blocks.instances_on(1)]


def test_pack_models_stays_explicit():
    plan = make_plan(load_site("aurora"), resolve({"pack_models": True, "models": [
        {"model": "a/big", "instances": 1, "tensor_parallel_size": 8},
        {"model": "b/small", "instances": 4}]}))
    assert plan.blocks == [] and [i.name for i in plan.instances] == ["big-0", "small-0", "small-1", "small-2",
                                                                     "small-3"]
    assert [i.name for i in plan.instances_on(0)] == [i.name for i in plan.instances]


def test_120000_instances_are_one_block_of_constant_size():
    site = load_site("aurora")
    plans = {n: make_plan(site, resolve({"model": "m/x", "instances": n})) for n in (13, 120_000)}
    plan = plans[120_000]
    assert plan.nodes_required == 10_000 and len(plan.instances) == 120_000
    last = plan.instances[-1]
    assert (last.name, last.head.node, last.port, last.head.devices) == ("x-119999", 9999, 8011, ["11"])
    assert plan.instances[119_999] == last and plan.instances[12].head.node == 1
    assert [i.name for i in plan.instances[5:8]] == ["x-5", "x-6", "x-7"]
    with pytest.raises(IndexError):
        plan.instances[120_000]
    assert [i.port for i in plan.instances_on(9999)] == list(range(8000, 8012))
    assert plan.instances_on(10_000) == [] and plan.instances_on(-1) == []
    assert [i.name for i in plans[13].instances_on(1)] == ["x-12"]  # the last node partly filled
    sizes = {n: len(p.to_json()) for n, p in plans.items()}
    assert sizes[120_000] - sizes[13] < 20  # only the digits of the counts differ
    assert Plan.from_dict(json.loads(plan.to_json())).instances[-1].to_dict() == last.to_dict()


def test_damaged_blocks_are_refused(tmp_path):
    plan = make_plan(load_site("aurora"), resolve({"models": [{"model": "a/x", "instances": 3},
                                                              {"model": "b/y", "instances": 2,
                                                               "port_start": 8100}]}))
    doc = plan.to_dict()
    doc["blocks"][1]["position"] = 2  # overlaps the first block
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFileError, match="cannot read the plan .*overlaps"):
        Plan.read(path)
    doc["blocks"][1]["position"] = 3
    doc["blocks"][1]["slots"] = []
    path.write_text(json.dumps(doc))
    with pytest.raises(AegisError, match="no slots"):
        Plan.read(path)


def test_table_summarises_blocks_and_all_lists_every_instance(tmp_path, capsys):
    plan = make_plan(load_site("aurora"), resolve({"model": "m/x", "instances": 120_000}))
    text = format_table(plan)
    lines = text.splitlines()
    assert len(lines) < 20
    assert lines[-3].split() == ["x-12..119999", "m/x", "1x1", "1-9999", "as", "on", "node", "0", "8000-8011"]
    assert "--all lists every instance" in text
    small = make_plan(load_site("aurora"), resolve({"model": "m/x", "instances": 64}))  # 6 nodes: in full
    assert "--all" not in format_table(small) and len(format_table(small).splitlines()) == 3 + 64
    cfg = write(tmp_path, "site: aurora\nmodel: m/x\ninstances: 65\n")
    code, out, err = run_cli(capsys, "plan", cfg)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 + 12 + 1 + 2 and lines[-3].split() == ["x-12..64", "m/x", "1x1", "1-5", "as", "on",
                                                                  "node", "0", "8000-8011"]
    code, out, err = run_cli(capsys, "plan", cfg, "--all")
    assert code == 0, err
    assert len(out.splitlines()) == 3 + 65 and "x-64" in out and "--all" not in out
    code, out, err = run_cli(capsys, "plan", cfg, "--json", "--all")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["blocks"] == [] and [i["name"] for i in doc["instances"]] == [f"x-{i}" for i in range(65)]
    code, out, err = run_cli(capsys, "plan", cfg, "--json")
    assert code == 0, err
    assert len(json.loads(out)["blocks"]) == 1


def test_job_script_does_not_grow_with_the_node_count(tmp_path):
    """Issue 14: the job script of 7,000 Aurora nodes is the script of 1 node with other numbers (Aurora's
    largest queue, prod, takes up to 7,300 nodes)."""
    import subprocess
    import sys

    sizes = {}
    for n in (12, 84_000):
        cfg = tmp_path / f"c{n}.yaml"
        cfg.write_text(f"site: aurora\nmodel: meta-llama/Llama-3.1-8B-Instruct\ninstances: {n}\n")
        proc = subprocess.run([sys.executable, "-m", "aegis", "submit", str(cfg), "--dry-run", "--run-dir",
                               str(tmp_path / f"r{n}")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        sizes[n] = len((tmp_path / f"r{n}" / "job.sh").read_text()) if (tmp_path / f"r{n}" / "job.sh").exists() \
            else len(proc.stdout)
    assert sizes[84_000] - sizes[12] < 40, sizes  # only select=N, the queue and the counts in a comment differ
