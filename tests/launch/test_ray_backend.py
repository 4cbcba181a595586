"""vLLM across nodes over Ray (aegis/engines/ray.py): which backend a model gets, and a real Ray cluster of two
"nodes" on this machine started, waited for and stopped through the agent's own code.

The commands follow ALCF's multi-node vLLM recipe (argonne-lcf/user-guides
docs/aurora/data-science/inference/vllm.md and setup_ray_cluster.sh: `ray start --head`, `ray start --address
HEAD:PORT`, "ray status # should show 2 active nodes and 16 GPUs total", then `vllm serve ...
--distributed-executor-backend ray`) and vLLM's examples/online_serving/multi-node-serving.sh (the head waits
until `ray.nodes()` counts every node alive). vLLM itself is not started over Ray here: its CPU platform has
no Ray device key (vllm/platforms/interface.py `ray_device_key = ""`), so the command after the wait is a
Ray driver that reports what it sees.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from aegis.config.schema import resolve
from aegis.config.sites import load_site
from aegis.engines.ray import WAIT_SCRIPT
from aegis.errors import ConfigError, SiteError
from aegis.launch.agent import Agent
from aegis.launch.ranks import build_ranks
from aegis.plan.placement import make_plan
from aegis.rundir import RunDir
from tests.core.helpers import run_cli, write

SITE = """\
name: two-gpu
inherits: h200
devices_per_node: 2
domains: [{devices: "0-1", cpus: "0-1"}]
device_cpus: {}
multinode_backends: {vllm: ray}
"""
SPAN = {"model": "m/x", "tensor_parallel_size": 2, "pipeline_parallel_size": 2}


def two_gpu_site(tmp_path: Path):
    path = tmp_path / "two-gpu.yaml"
    path.write_text(SITE)
    return load_site("two-gpu", site_files=(str(path),)).resolved()


def ranks(tmp_path, site, raw, index, hosts, key="k3y"):
    cfg = resolve(raw)
    return build_ranks(RunDir(tmp_path), index, site, cfg, make_plan(site, cfg, nodes=len(hosts)), hosts, key,
                       network=lambda address: (None, address))


def test_the_model_key_overrides_the_sites_backend(tmp_path):
    site = two_gpu_site(tmp_path)
    ray = ranks(tmp_path, site, SPAN, 0, ["n0", "n1"])
    native = ranks(tmp_path, site, {**SPAN, "multinode_backend": "native"}, 0, ["n0", "n1"])
    assert [r.key for r in ray] == ["x-0.ray-head", "x-0"] and [r.key for r in native] == ["x-0"]
    assert "--distributed-executor-backend" in ray[1].argv and "--nnodes" in native[0].argv
    assert ray[0].listen == ("n0", 28000) and ray[1].env["RAY_ADDRESS"] == "n0:28000"
    assert ray[1].listen == ("n0", 8000) and ray[1].head and not ray[0].head
    worker, = ranks(tmp_path, site, SPAN, 1, ["n0", "n1"])
    assert worker.key == "x-0.rank1" and "VLLM_API_KEY" not in worker.env  # a Ray node holds no key
    h200 = load_site("h200").resolved()  # no multinode_backends: vLLM's own --nnodes mode
    assert "--nnodes" in ranks(tmp_path, h200, {**SPAN, "tensor_parallel_size": 8}, 0, ["n0", "n1"])[0].argv


def test_bad_backends_are_one_line(tmp_path, capsys):
    cfg = write(tmp_path, "model: m/x\nengine: sglang\nmultinode_backend: ray\n")
    code, _, err = run_cli(capsys, "plan", cfg)
    assert code == 2 and "multinode_backend: engine 'sglang' has no such option" in err and err.count("\n") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ninherits: h200\nmultinode_backends: {sglang: ray}\n")
    with pytest.raises(SiteError, match="multinode_backends: engine 'sglang' has only its native multi-node mode"):
        load_site("bad", site_files=(str(bad),))
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text("name: cpu2\ninherits: two-gpu\ndevice_kind: cpu\n")
    (tmp_path / "two-gpu.yaml").write_text(SITE)
    site = load_site("cpu2", site_files=(str(tmp_path / "two-gpu.yaml"), str(cpu))).resolved()
    with pytest.raises(ConfigError, match="vLLM's CPU platform cannot use Ray"):
        ranks(tmp_path, site, SPAN, 0, ["n0", "n1"])


def test_the_wait_without_ray_is_one_line():
    """The engine's Python has no Ray (this test venv): one line naming the Python and the fix, exit 2."""
    proc = subprocess.run([sys.executable, WAIT_SCRIPT, "--address", "h:1", "--nodes", "2", "--gpus", "2", "--",
                           "true"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 2:
        pytest.skip("this Python has Ray")
    assert proc.stderr.count("\n") == 1 and "has no Ray" in proc.stderr and sys.executable in proc.stderr


# --------------------------------------------------------------------------- a real Ray cluster


def ray_python() -> str | None:
    """A Python with Ray: AEGIS_RAY_PYTHON, else the CPU vLLM venv's if it has Ray."""
    candidates = [os.environ.get("AEGIS_RAY_PYTHON"), os.path.expanduser("~/.cache/aegis/vllm-venv/bin/python")]
    for python in filter(None, candidates):
        if os.access(python, os.X_OK) and subprocess.run([python, "-c", "import ray"],
                                                         capture_output=True).returncode == 0:
            return python
    return None


def this_ip() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def group(pgid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


@pytest.mark.slow
def test_two_ray_nodes_on_this_machine_through_the_agent(tmp_path):
    python, ip = ray_python(), this_ip()
    if python is None:
        pytest.skip("no Python with Ray: the CPU vLLM venv has none; set AEGIS_RAY_PYTHON to one")
    if ip is None:
        pytest.skip("no non-loopback IPv4 address here")
    site = two_gpu_site(tmp_path)
    port = 30000 + os.getpid() % 5000  # its rendezvous (Ray GCS) port is port + 20000
    raw = {**SPAN, "engine_python": python, "port_start": port, "env": {"RAY_USAGE_STATS_ENABLED": "0"}}
    run = RunDir(tmp_path)
    head_node = ranks(tmp_path, site, raw, 0, [ip, ip], key=None)
    worker_node = ranks(tmp_path, site, raw, 1, [ip, ip], key=None)
    ray_head, serve = head_node
    cut = serve.argv.index("--")
    assert serve.argv[cut + 1].endswith("/vllm") and "--distributed-executor-backend" in serve.argv
    report = "import ray; ray.init(); n = [x for x in ray.nodes() if x['Alive']]; " \
             "print('SEEN', len(n), ray.cluster_resources().get('GPU'), flush=True)"
    serve.argv = serve.argv[:cut + 1] + [python, "-c", report]  # a Ray driver in place of vLLM (CPU has no Ray)
    agents = [Agent(run, 0, head_node, max_restarts=0, grace=15, host="n0"),
              Agent(run, 1, worker_node, max_restarts=0, grace=15, host="n1")]
    try:
        for agent in agents:
            for rank in agent.ranks:
                agent._start(rank)
        deadline = time.monotonic() + 240
        while serve.proc is not None and serve.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        log = serve.log.read_text()
        assert serve.proc is not None and serve.proc.returncode == 0, log[-3000:]
        # ALCF: "ray status # should show 2 active nodes and 16 GPUs total" (here 2 nodes x 2 GPUs)
        assert "has 2 node(s) and 4 GPU(s)" in log and "SEEN 2 4.0" in log, log[-3000:]
        # The wait's timeout: one line naming what has not joined (a third node that never comes).
        late = subprocess.run([python, WAIT_SCRIPT, "--address", f"{ip}:{port + 20000}", "--nodes", "3", "--gpus",
                               "6", "--timeout", "3", "--host", ip, "--host", "203.0.113.9", "--", "true"],
                              capture_output=True, text=True, timeout=120)
        assert late.returncode == 1 and late.stderr.count("\n") == 1, late.stderr
        assert "has 2 of 3 node(s) and 4 of 6 GPU(s)" in late.stderr and "not joined: 203.0.113.9" in late.stderr
        # Ray's processes stay in the process groups the agent started (gcs_server, raylet, ...).
        names = {p.name() for r in (ray_head, worker_node[0]) if r.proc for p in group(r.proc.pid)}
        assert {"gcs_server", "raylet"} <= names, names
        pgids = [r.proc.pid for r in (ray_head, worker_node[0]) if r.proc]
    finally:
        for agent in agents:
            agent.stop()
    left = [p for pgid in pgids for p in group(pgid)]
    assert not left, f"left behind: {[(p.pid, p.name()) for p in left]}"
    temp_dirs = [a for r in (ray_head, worker_node[0]) for a in r.argv if a.startswith("/tmp/aegis-ray-")]
    stray = [p.pid for p in psutil.process_iter(["cmdline"])
             if any(d in " ".join(p.info["cmdline"] or []) for d in temp_dirs)]
    for folder in temp_dirs:  # Ray's session files (logs, sockets) of this test's two "nodes"
        shutil.rmtree(folder, ignore_errors=True)
    assert not stray, f"Ray processes of this cluster outside the groups: {stray}"
