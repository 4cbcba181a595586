"""Real CPU vLLM instances started by `aegis submit` inside the 3-node Slurm cluster."""
import json
import time
import urllib.request

import psutil
import pytest

from tests.fixtures.vllm import BASE_ARGS, BASE_ENV, run_processes
from tests.sched.test_slurm_jobs import SITES, aegis, config

pytestmark = pytest.mark.slow
TIMEOUT = 1200


def complete(url, model, key):
    req = urllib.request.Request(url + "/v1/completions",
                                 data=json.dumps({"model": model, "prompt": "hi", "max_tokens": 3}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def launch(cluster, tmp_path, vllm_env, **raw):
    cfg = config(tmp_path, model=str(vllm_env.model_dir), engine_python=str(vllm_env.python),
                 env=dict(BASE_ENV), extra_vllm_args=list(BASE_ARGS), startup_timeout=TIMEOUT,
                 walltime="00:40:00", **raw)
    run = tmp_path / "run"
    proc = aegis(cluster, "submit", cfg, "--site-file", SITES / "testcluster-cpu.yaml", "--run-dir", run,
                 "--wait", "--timeout", str(TIMEOUT), timeout=TIMEOUT + 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (run / "logs" / "agents.log").read_text()
    return run, json.loads((run / "endpoints.json").read_text())


def stop(cluster, run):
    proc = aegis(cluster, "shutdown", run, "--timeout", "180")
    assert proc.returncode == 0, proc.stderr
    job_id = (run / "job_id").read_text().strip()
    deadline = time.monotonic() + 120
    while json.loads(aegis(cluster, "status", run, "--json").stdout)["state"] not in ("completed",):
        assert time.monotonic() < deadline, f"job {job_id} did not complete after shutdown"
        time.sleep(1)
    deadline = time.monotonic() + 60
    while run_processes(run):
        assert time.monotonic() < deadline, f"left behind: {[p.cmdline()[:3] for p in run_processes(run)]}"
        time.sleep(1)


def test_instances_on_two_nodes_answer(slurm_cluster, tmp_path, vllm_env):
    run, doc = launch(slurm_cluster, tmp_path, vllm_env, instances=2)
    hosts = sorted(i["hostname"] for i in doc["instances"])
    assert hosts == ["node1", "node2"]
    key = (run / "api_key").read_text().strip()
    for inst in doc["instances"]:
        assert inst["url"] == f"http://{inst['hostname']}:{inst['port']}"
        assert complete(inst["url"], inst["model"], key)["usage"]["completion_tokens"] == 3  # from the host
    stop(slurm_cluster, run)


def test_one_instance_spanning_two_nodes(slurm_cluster, tmp_path, vllm_env):
    """TP=2 over two nodes (one rank each): vLLM's multi-node mode, readiness on the head rank."""
    run, doc = launch(slurm_cluster, tmp_path, vllm_env, tensor_parallel_size=2)
    (inst,) = doc["instances"]
    assert inst["nodes"] == ["node1", "node2"] and inst["hostname"] == "node1"
    statuses = [json.loads(p.read_text()) for p in sorted((run / "nodes").glob("*.status.json"))]
    worker = statuses[1]["ranks"][f"{inst['name']}.rank1"]
    assert worker["state"] == "running" and worker["pid"]
    argv = psutil.Process(worker["pid"]).cmdline()
    assert "--headless" in argv and argv[argv.index("--node-rank") + 1] == "1"
    assert argv[argv.index("--master-addr") + 1] == "node1"
    env = psutil.Process(worker["pid"]).environ()
    assert env["VLLM_HOST_IP"] == slurm_cluster.node_addresses["node2"] and env["GLOO_SOCKET_IFNAME"]
    key = (run / "api_key").read_text().strip()
    assert complete(inst["url"], inst["model"], key)["usage"]["completion_tokens"] == 3
    stop(slurm_cluster, run)
