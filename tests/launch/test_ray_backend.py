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

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from aegis.config.schema import resolve
from aegis.config.sites import load_site
from aegis.engines import EngineLaunch
from aegis.engines.ray import HEAD_PORTS, NODE_PORTS, START_SCRIPT, WAIT_SCRIPT, WORKER_PORTS, temp_dir, temp_root
from aegis.engines.ray import PORTS as RAY_PORTS
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


def test_each_ray_cluster_has_ports_of_its_own(tmp_path):
    """Two Ray-backed instances: every port each `ray start` sets is in its instance's block (from its rendezvous
    port), the head's part and the other nodes' part do not overlap, the blocks of the two do not either, and none of
    Ray's fixed defaults is left (GCS 6379, client server 10001, dashboard 8265, dashboard agent 52365)."""
    site = two_gpu_site(tmp_path)
    raw = {"models": [{**SPAN, "model": "m/a"}, {**SPAN, "model": "m/b"}]}
    cfg = resolve(raw)
    plan = make_plan(site, cfg, nodes=4)
    a, b = plan.instances
    assert (a.port, a.ray_ports, b.port, b.ray_ports) == (8000, "28000-28526", 8600, "28600-29126")
    seen: dict[int, str] = {}
    for node in range(4):
        for rank in build_ranks(RunDir(tmp_path), node, site, cfg, plan, ["h0", "h1", "h2", "h3"], None,
                                network=lambda address: (None, address)):
            if "start" not in rank.argv:
                continue
            argv = rank.argv
            low, high = map(int, (a if rank.instance == a.name else b).ray_ports.split("-"))
            given = {f: int(argv[argv.index(f) + 1]) for f in [*HEAD_PORTS, *NODE_PORTS] if f in argv}
            workers = range(int(flag_of(argv, "--min-worker-port")), int(flag_of(argv, "--max-worker-port")) + 1)
            assert len(workers) == WORKER_PORTS and len(given) == (9 if rank.part == "ray-head" else 6)
            for port in [*given.values(), *workers]:
                assert low <= port <= high and port not in seen, (rank.key, port, seen.get(port))
                seen[port] = rank.key
            assert not {6379, 10001, 8265, 52365} & set(given.values())
            assert flag_of(argv, "--temp-dir") == f"/tmp/aegis-ray-{low}-{rank.rank}"
            if rank.part == "ray-head":
                assert argv[:2] == ["python3", START_SCRIPT] and given["--port"] == low and rank.listen == ("h0"
                       if rank.instance == a.name else "h2", low)
            else:  # a worker node: its node manager's port is checked free before it starts
                assert rank.listen == (f"h{node}", given["--node-manager-port"])
    assert len(seen) == 2 * RAY_PORTS  # every port of both blocks, each once


def flag_of(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_ray_ports_in_the_plan_and_its_refusals(tmp_path, capsys):
    """`aegis plan --json` lists each Ray cluster's block; `--commands` its flags; a block that would overlap
    another model's ports or the gateway's, or pass 65535, is refused in one line."""
    site_file = tmp_path / "two-gpu.yaml"
    site_file.write_text(SITE)
    head = "site: two-gpu\n"

    def plan(cfg, *flags):
        return run_cli(capsys, "plan", cfg, "--site-file", site_file, *flags)

    two = "models:\n  - {model: m/a, tensor_parallel_size: 2, pipeline_parallel_size: 2, port_start: 8000}\n"
    cfg = write(tmp_path, head + two + "  - {model: m/b, tensor_parallel_size: 2, pipeline_parallel_size: 2}\n")
    code, out, err = plan(cfg, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [(i["port"], i["ray_ports"]) for i in doc["instances"]] == [(8000, "28000-28526"), (8600, "28600-29126")]
    code, out, err = plan(cfg, "--commands")
    assert code == 0, err
    assert "--port 28600 --ray-client-server-port 28601 --dashboard-port 28602" in out
    assert "--min-worker-port 28871 --max-worker-port 29126" in out  # m/b's other nodes
    cases = [
        ("  - {model: m/b, tensor_parallel_size: 2, pipeline_parallel_size: 2, port_start: 8100}\n",
         "port ranges overlap: 'a' (its Ray cluster) uses 28000-28526 and 'b' (its Ray cluster) uses 28100-28626"),
        ("  - {model: m/b, port_start: 28500}\n",
         "port ranges overlap: 'a' (its Ray cluster) uses 28000-28526 and 'b' uses 28500-28500"),
        ("gateway: true\ngateway_port: 28100\n",
         "gateway_port 28100 is in the port range of 'a' (its Ray cluster) (28000-28526)"),
    ]
    for extra, message in cases:
        code, _, err = plan(write(tmp_path, head + two + extra))
        assert code == 2 and message in err and err.count("\n") == 1, err
    high = "models:\n  - {model: m/a, tensor_parallel_size: 2, pipeline_parallel_size: 2, port_start: 45200}\n"
    code, _, err = plan(write(tmp_path, head + high))
    assert code == 2 and "its Ray cluster's ports 65200-65726 (527 from port 45200 + 20000) go past 65535" in err
    native = "models:\n  - {model: m/a, tensor_parallel_size: 2, pipeline_parallel_size: 2, port_start: 8000, " \
             "multinode_backend: native}\n  - {model: m/b, port_start: 28000}\n"
    code, _, err = plan(write(tmp_path, head + native))
    assert code == 2 and "'a' (its rendezvous port) uses 28000-28000 and 'b' uses 28000-28000" in err


def test_ray_session_folders_are_short_and_per_node(tmp_path):
    """Under the rank's RAY_TMPDIR, else TMPDIR, else /tmp; /tmp when the path would leave Ray's AF_UNIX sockets
    (TEMP/session_<date>_<pid>/sockets/plasma_store) longer than 107 bytes (ALCF's known issue)."""
    def folder(env: dict[str, str], rank: int = 0) -> str:
        launch = EngineLaunch(model="m", served_name="m", host="h", port=8000, tensor_parallel_size=2,
                              pipeline_parallel_size=2, nnodes=2, node_rank=rank, master_addr="h", master_port=28000,
                              tmpdir=temp_root(env))
        return temp_dir(launch)

    assert folder({}) == "/tmp/aegis-ray-28000-0" and folder({}, 1) == "/tmp/aegis-ray-28000-1"
    assert folder({"TMPDIR": "/local/job7"}) == "/local/job7/aegis-ray-28000-0"
    assert folder({"TMPDIR": "/local/job7", "RAY_TMPDIR": "/tmp"}) == "/tmp/aegis-ray-28000-0"
    long = "/lus/flare/projects/some-project/user/tmp"
    assert folder({"TMPDIR": long}) == "/tmp/aegis-ray-28000-0" and folder({"TMPDIR": "relative"}).startswith("/tmp/")
    socket_path = f"{folder({'TMPDIR': '/local/scratch/jb'})}/session_2026-12-04_19-54-09_123456_4194304/sockets/" \
                  "plasma_store"
    assert len(socket_path) <= 107, socket_path


def test_the_head_start_drops_the_client_port_without_ray_client(tmp_path):
    """`ray start` refuses --ray-client-server-port without ray[client] (no grpc); aegis_raystart.py drops it there
    and keeps it where grpc imports, then execs the command."""
    spec = importlib.util.spec_from_file_location("aegis_raystart", START_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["ray", "start", "--head", "--ray-client-server-port", "28001", "--block"]
    assert module.argv_for(argv, True) == argv
    assert module.argv_for(argv, False) == ["ray", "start", "--head", "--block"]
    assert module.argv_for(["ray", "--ray-client-server-port=5", "x"], False) == ["ray", "x"]
    client = importlib.util.find_spec("grpc") is not None
    out = subprocess.run([sys.executable, START_SCRIPT, "echo", "start", "--ray-client-server-port", "28001"],
                         capture_output=True, text=True, timeout=60).stdout
    assert out.split() == (["start", "--ray-client-server-port", "28001"] if client else ["start"])


# --------------------------------------------------------------------------- a real Ray cluster


def ray_python() -> str | None:
    """A Python with Ray: AEGIS_RAY_PYTHON (tests/setup.d/45-ray.sh sets it), else the Ray venv or the CPU vLLM
    venv of $AEGIS_CACHE if it has Ray."""
    cache = os.environ.get("AEGIS_CACHE") or os.path.expanduser("~/.cache/aegis")
    candidates = [os.environ.get("AEGIS_RAY_PYTHON"), os.path.join(cache, "ray-venv", "bin", "python"),
                  os.path.join(cache, "vllm-venv", "bin", "python")]
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


REPORT = ("import ray; ray.init(); n = [x for x in ray.nodes() if x['Alive']]; "
          "print('SEEN', len(n), ray.cluster_resources().get('GPU'), ray.get_runtime_context().gcs_address, "
          "flush=True)")


def port_for_ray() -> int:
    """A serving port whose Ray blocks (two clusters: 1127 ports from port + 20000) stay below Linux's ephemeral
    range (32768 on): a port there may be the local end of any outgoing connection when Ray binds it."""
    return 10000 + os.getpid() % 16 * 100


def need_ray() -> tuple[str, str]:
    python, ip = ray_python(), this_ip()
    if python is None:
        pytest.skip("no Python with Ray: bash tests/run.sh makes one (tests/setup.d/45-ray.sh), or set "
                    "AEGIS_RAY_PYTHON to one")
    if ip is None:
        pytest.skip("no non-loopback IPv4 address here")
    return python, ip


def as_driver(serve, python: str) -> None:
    """The instance's `vllm serve` (after the wait) replaced by a Ray driver that reports what it sees: vLLM's CPU
    platform has no Ray device."""
    cut = serve.argv.index("--")
    assert serve.argv[cut + 1].endswith("/vllm") and "--distributed-executor-backend" in serve.argv
    serve.argv = serve.argv[:cut + 1] + [python, "-c", REPORT]


def run_until_served(agents: list[Agent], serves: list, seconds: float = 120) -> None:
    for agent in agents:
        for rank in agent.ranks:
            agent._start(rank)
    deadline = time.monotonic() + seconds
    while any(s.proc is not None and s.proc.poll() is None for s in serves) and time.monotonic() < deadline:
        time.sleep(0.5)
    for serve in serves:
        log = serve.log.read_text()
        assert serve.proc is not None and serve.proc.returncode == 0, log[-3000:]


def stop_all(agents: list[Agent]) -> None:
    """Every agent's stop at once (`ray start --block` takes longer than the 5 s grace to end on SIGTERM: then
    the agent kills its group)."""
    with ThreadPoolExecutor(len(agents)) as pool:
        list(pool.map(lambda a: a.stop(), agents))


def descendants(rank) -> list[psutil.Process]:
    """The `ray start` of a rank and everything under it (its workers lead process groups of their own)."""
    try:
        top = psutil.Process(rank.proc.pid)
        return [top, *top.children(recursive=True)]
    except psutil.Error:
        return []


def listening(procs: list[psutil.Process]) -> dict[int, str]:
    """TCP port -> name of the process listening there, over `procs`."""
    pids = {p.pid: p for p in procs}
    out = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                out[conn.laddr.port] = pids[conn.pid].name()
            except psutil.Error:
                pass
    return out


def temp_dirs(ranks) -> list[str]:
    return [r.argv[r.argv.index("--temp-dir") + 1] for r in ranks]


def assert_all_gone(ray_ranks, pgids: list[int]) -> None:
    left = [p for pgid in pgids for p in group(pgid)]
    assert not left, f"left behind: {[(p.pid, p.name()) for p in left]}"
    folders = temp_dirs(ray_ranks)
    stray = [p.pid for p in psutil.process_iter(["cmdline"])
             if any(d in " ".join(p.info["cmdline"] or []) for d in folders)]
    for folder in folders:  # Ray's session files (logs, sockets) of this test's "nodes"
        shutil.rmtree(folder, ignore_errors=True)
    assert not stray, f"Ray processes of these clusters outside the groups: {stray}"


@pytest.mark.slow
def test_two_ray_nodes_on_this_machine_through_the_agent(tmp_path):
    python, ip = need_ray()
    site = two_gpu_site(tmp_path)
    port = port_for_ray()  # its rendezvous (Ray GCS) port is port + 20000
    raw = {**SPAN, "engine_python": python, "port_start": port, "env": {"RAY_USAGE_STATS_ENABLED": "0"}}
    run = RunDir(tmp_path)
    head_node = ranks(tmp_path, site, raw, 0, [ip, ip], key=None)
    worker_node = ranks(tmp_path, site, raw, 1, [ip, ip], key=None)
    ray_head, serve = head_node
    as_driver(serve, python)
    agents = [Agent(run, 0, head_node, max_restarts=0, grace=5, host="n0"),
              Agent(run, 1, worker_node, max_restarts=0, grace=5, host="n1")]
    pgids: list[int] = []
    try:
        run_until_served(agents, [serve])
        log = serve.log.read_text()
        # ALCF: "ray status # should show 2 active nodes and 16 GPUs total" (here 2 nodes x 2 GPUs)
        assert "has 2 node(s) and 4 GPU(s)" in log and f"SEEN 2 4.0 {ip}:{port + 20000}" in log, log[-3000:]
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
        stop_all(agents)
    assert_all_gone([ray_head, worker_node[0]], pgids)


@pytest.mark.slow
def test_two_ray_clusters_whose_heads_share_a_node(tmp_path):
    """Two Ray-backed instances on one host (this machine plays all four nodes: both heads, both workers): each
    cluster on its own ports (the block placement reserves from its rendezvous port) and in its own session
    folders; both serve, and each sees only its own two nodes. With Ray's fixed ports they would clash (the
    client server's 10001 where ray[client] is installed, the dashboard agent's 52365, ...)."""
    python, ip = need_ray()
    site = two_gpu_site(tmp_path)
    port = port_for_ray()
    raw = {"models": [{**SPAN, "model": "m/a", "port_start": port}, {**SPAN, "model": "m/b"}],
           "engine_python": python, "env": {"RAY_USAGE_STATS_ENABLED": "0"}}
    cfg = resolve(raw)
    plan = make_plan(site, cfg, nodes=4)
    a, b = plan.instances
    assert a.nodes == [0, 1] and b.nodes == [2, 3] and b.port == port + 600  # past a's Ray block (527 ports)
    blocks = {inst.name: tuple(map(int, inst.ray_ports.split("-"))) for inst in (a, b)}
    assert blocks[a.name] == (port + 20000, port + 20000 + RAY_PORTS - 1) and blocks[a.name][1] < blocks[b.name][0]
    run = RunDir(tmp_path)
    hosts = [ip] * 4
    nodes = [build_ranks(run, i, site, cfg, plan, hosts, None, network=lambda address: (None, address))
             for i in range(4)]
    heads = [nodes[0], nodes[2]]
    serves = [node[1] for node in heads]
    for serve in serves:
        as_driver(serve, python)
    ray_ranks = [heads[0][0], nodes[1][0], heads[1][0], nodes[3][0]]  # a's head and worker, b's head and worker
    assert len(set(temp_dirs(ray_ranks))) == 4
    agents = [Agent(run, i, node, max_restarts=0, grace=5, host=f"n{i}") for i, node in enumerate(nodes)]
    pgids: list[int] = []
    try:
        run_until_served(agents, serves)
        for inst, serve in zip((a, b), serves):
            gcs = f"{ip}:{blocks[inst.name][0]}"
            log = serve.log.read_text()
            assert "has 2 node(s) and 4 GPU(s)" in log and f"SEEN 2 4.0 {gcs}" in log, log[-3000:]
        client = subprocess.run([python, "-c", "import grpc"], capture_output=True).returncode == 0
        for inst, pair in zip((a, b), (ray_ranks[:2], ray_ranks[2:])):
            low, high = blocks[inst.name]
            ports = listening([p for r in pair for p in descendants(r)])
            outside = {port_: name for port_, name in ports.items() if not low <= port_ <= high}
            assert not outside, f"{inst.name}'s Ray listens outside {low}-{high}: {outside}"
            assert ports.get(low) == "gcs_server", ports
            assert (ports.get(low + 1) is not None) == client, ports  # its own client server, where Ray has one
        pgids = [r.proc.pid for r in ray_ranks if r.proc]
    finally:
        stop_all(agents)
    assert_all_gone(ray_ranks, pgids)
