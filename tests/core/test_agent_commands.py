"""The engine command lines and environments the agent builds from a plan (no engine is started)."""
import json

from aegis.config.schema import resolve
from aegis.config.sites import load_site
from aegis.launch.ranks import build_ranks, master_port
from aegis.plan.placement import make_plan
from aegis.rundir import RunDir


def ranks_for(tmp_path, site_name, raw, index, hosts, key="k3y"):
    site = load_site(site_name).resolved()
    cfg = resolve(raw)
    plan = make_plan(site, cfg, nodes=len(hosts))
    return build_ranks(RunDir(tmp_path), index, site, cfg, plan, hosts, key)


def test_multi_node_instance_uses_vllm_multinode_flags(tmp_path):
    raw = {"model": "zai-org/GLM-4.6", "tensor_parallel_size": 8, "pipeline_parallel_size": 2,
           "engine_python": "/soft/vllm/bin/python", "extra_vllm_args": ["--max-num-seqs", "256"]}
    hosts = ["gpu-a01", "gpu-a02"]
    head = ranks_for(tmp_path, "h200", raw, 0, hosts)
    worker = ranks_for(tmp_path, "h200", raw, 1, hosts)
    assert len(head) == len(worker) == 1
    h, w = head[0].argv, worker[0].argv
    # `vllm serve` next to the engine's Python: the api_server module ignores --headless.
    assert h[:3] == w[:3] == ["/soft/vllm/bin/vllm", "serve", "zai-org/GLM-4.6"]
    for argv, rank in ((h, "0"), (w, "1")):
        assert argv[argv.index("--nnodes") + 1] == "2"
        assert argv[argv.index("--node-rank") + 1] == rank
        assert argv[argv.index("--master-addr") + 1] == "gpu-a01"
        assert argv[argv.index("--master-port") + 1] == str(master_port(8000)) == "28000"
        assert argv[argv.index("--tensor-parallel-size") + 1] == "8"
        assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
        assert argv[-2:] == ["--max-num-seqs", "256"]
    assert "--headless" not in h and "--headless" in w
    assert h[h.index("--host") + 1] == "gpu-a01" and w[w.index("--host") + 1] == "gpu-a02"
    assert head[0].env["CUDA_VISIBLE_DEVICES"] == worker[0].env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert head[0].head and not worker[0].head
    assert worker[0].log.name == "glm-4.6-0.rank1.log"


def test_aurora_ranks_get_tiles_cores_key_and_site_env(tmp_path):
    raw = {"model": "meta-llama/Llama-3.1-8B-Instruct", "instances": 12, "env": {"A": "1"},
           "hf_home": "/tmp/hf"}
    ranks = ranks_for(tmp_path, "aurora", raw, 0, ["x4102c5s2b0n0"])
    assert [r.env["ZE_AFFINITY_MASK"] for r in ranks] == [str(i) for i in range(12)]
    assert ranks[0].cpus == list(range(1, 9)) and ranks[6].cpus == list(range(53, 61))
    r = ranks[3]
    assert r.env["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT" and r.env["A"] == "1" and r.env["HF_HOME"] == "/tmp/hf"
    assert r.env["VLLM_API_KEY"] == "k3y" and "k3y" not in " ".join(r.argv)
    assert r.argv[r.argv.index("--port") + 1] == "8003"
    assert r.argv[r.argv.index("--served-model-name") + 1] == "meta-llama/Llama-3.1-8B-Instruct"


def test_staged_weights_replace_the_model(tmp_path):
    (tmp_path / "staged.json").write_text(json.dumps({
        "llama-3.1-8b-instruct": {"hf_home": "/tmp/aegis-models", "model": "meta-llama/Llama-3.1-8B-Instruct"}}))
    ranks = ranks_for(tmp_path, "aurora", {"model": "meta-llama/Llama-3.1-8B-Instruct",
                                           "model_source": "/flare/hub/models--meta-llama--Llama-3.1-8B-Instruct"},
                      0, ["n0"])
    env = ranks[0].env
    assert env["HF_HOME"] == "/tmp/aegis-models" and env["HF_HUB_OFFLINE"] == "1"
    assert ranks[0].argv[ranks[0].argv.index("--model") + 1] == "meta-llama/Llama-3.1-8B-Instruct"


def test_engine_gets_its_planned_cores_even_outside_the_agents_own(tmp_path):
    """SITE-AUDIT (Frontier): srun's default binds a 1-CPU task to one hardware thread (OLCF Frontier user
    guide, "-c ... default is 1", "--cpu-bind=threads (default)"); an agent that only intersected its
    planned cores with its own affinity put every engine on that thread. The engine gets its planned cores;
    cores the kernel refuses (not in the job's cpuset) fall back to what the agent may use."""
    import os
    import sys
    import time

    import pytest

    from aegis.launch.agent import Agent
    from aegis.launch.ranks import Rank

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    run = RunDir(tmp_path)
    run.logs.mkdir()
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    ranks = [Rank(instance="a", rank=0, argv=sleeper, env=dict(os.environ), cpus=[cores[1]], log=run.log("a")),
             Rank(instance="b", rank=0, argv=sleeper, env=dict(os.environ), cpus=[cores[0], 4096],
                  log=run.log("b"))]
    agent = Agent(run, 0, ranks, max_restarts=0, grace=1, host="localhost")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cores[0]})  # the agent as srun would bind it: one CPU
    try:
        for rank in ranks:
            agent._start(rank)
    finally:
        os.sched_setaffinity(0, before)
    try:
        time.sleep(0.2)
        assert os.sched_getaffinity(ranks[0].proc.pid) == {cores[1]}  # planned, outside the agent's own
        assert os.sched_getaffinity(ranks[1].proc.pid) == {cores[0]}  # CPU 4096 refused: the usable part
    finally:
        for rank in ranks:
            rank.proc.kill()
            rank.proc.wait()


def test_max_restarts_counts_within_the_restart_window(tmp_path):
    """Issue 17: an engine that crashes every 12 h on a 2-day job must not end `failed`; max_restarts
    counts the restarts of the last restart_window seconds."""
    import sys
    import time

    from aegis.launch.agent import Agent
    from aegis.launch.node_status import RankState
    from aegis.launch.ranks import Rank

    run = RunDir(tmp_path)
    run.logs.mkdir()
    rank = Rank(instance="a", rank=0, argv=[sys.executable, "-c", "pass"], env={}, cpus=[], log=run.log("a"))
    agent = Agent(run, 0, [rank], max_restarts=1, grace=1, host="localhost", restart_window=60)
    rank.restart_times = [time.monotonic() - 120]  # a restart two windows ago
    agent._died(rank)
    assert rank.state is RankState.RESTARTING and rank.restarts == 1
    agent._died(rank)  # a second one within the window: over the budget
    assert rank.state is RankState.FAILED
