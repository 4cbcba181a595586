"""`aegis launch` on the local site with real CPU vLLM servers (the tiny offline model)."""
import json
import os
import signal
import stat
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from tests.launch.fleet import aegis, free_port_block

pytestmark = pytest.mark.slow


def post(url, payload, key, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def state():
    return {}


def test_two_instances_become_healthy(fleet_factory, state):
    port = free_port_block(3)
    fleet = fleet_factory(instances=2, port_start=port, gateway=True, gateway_port=port + 2)
    state["fleet"] = fleet
    doc = fleet.endpoints()
    assert doc["state"] == "ready" and doc["site"] == "local"
    assert stat.S_IMODE((fleet.run_dir / "endpoints.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((fleet.run_dir / "api_key").stat().st_mode) == 0o600
    a, b = doc["instances"]
    assert (a["name"], b["name"]) == ("tiny-0", "tiny-1")
    assert a["model"] == "tiny" and a["host"] == "127.0.0.1" and b["port"] == a["port"] + 1
    assert a["devices"] != b["devices"]  # one core each
    assert all(i["status"] == "ready" and i["ready_seconds"] > 0 and i["pid"] for i in doc["instances"])
    # Startup phases; "loaded" comes from vLLM's own log line ("Loading weights took ... seconds",
    # vllm/model_executor/model_loader/default_loader.py), seen by the agent in the engine's log; its
    # report may reach the head just after the health gate passed.
    doc = fleet.wait(lambda d: all("loaded" in i["phases"] for i in d["instances"]), 10, "loaded phases")
    for inst in doc["instances"]:
        p = inst["phases"]
        assert set(p) == {"staged", "started", "loaded", "ready"}, p
        assert p["staged"] <= p["started"] < p["loaded"] <= p["ready"], p
    # Views and the health table, as a user reads them.
    view = yaml.safe_load(aegis("endpoints", fleet.run_dir).stdout)
    assert view == {"tiny": [a["url"], b["url"]]}
    assert aegis("endpoints", fleet.run_dir, "--format", "urls").stdout.split() == [a["url"], b["url"]]
    table = aegis("health", fleet.run_dir / "endpoints.json").stdout
    assert "2/2 healthy" in table
    # Each engine is bound to its own core (VLLM_CPU_OMP_THREADS_BIND from the plan).
    env_a = open(f"/proc/{a['pid']}/environ", "rb").read().split(b"\0")
    assert f"VLLM_CPU_OMP_THREADS_BIND={a['devices'][0]}".encode() in env_a


def test_completions_and_streaming(state):
    fleet = state["fleet"]
    for inst in fleet.endpoints()["instances"]:
        code, body = post(inst["url"] + "/v1/completions",
                          {"model": "tiny", "prompt": "hello", "max_tokens": 4}, fleet.key)
        assert code == 200, body
        assert json.loads(body)["usage"]["completion_tokens"] == 4
        code, body = post(inst["url"] + "/v1/completions",
                          {"model": "tiny", "prompt": "hello", "max_tokens": 4, "stream": True}, fleet.key)
        events = [line for line in body.decode().splitlines() if line.startswith("data: ")]
        assert code == 200 and events[-1] == "data: [DONE]" and len(events) >= 3
        # What the agent's stall check reads from a real vLLM behind the key guard: idle, 8 tokens generated
        # (plus the prompts) by the two requests above at least.
        from aegis.launch.agent import progress

        running, tokens = progress(inst["url"] + "/metrics", fleet.key, 10)
        assert running == 0 and tokens >= 8
        assert progress(inst["url"] + "/metrics", None, 10) is None  # without the key: no answer to read


def test_requests_without_the_key_are_refused(state):
    fleet = state["fleet"]
    inst = fleet.endpoints()["instances"][0]
    code, _ = post(inst["url"] + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}, None)
    assert code == 401
    code, _ = post(inst["url"] + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}, "wrong")
    assert code == 401
    # The key travels in the environment, never on a command line or in the files others read.
    cmdline = open(f"/proc/{inst['pid']}/cmdline", "rb").read()
    assert fleet.key.encode() not in cmdline
    for name in ("config.yaml", "plan.json", "endpoints.json", "allocation.json"):
        assert fleet.key not in (fleet.run_dir / name).read_text()


def test_every_route_of_the_engine_needs_the_key(state):
    """Issue 17: vLLM's --api-key guards only /v1, /v2, /inference and /cohere (its cli_args.py: "/invocations
    ... remain unauthenticated"); aegis's key guard (vLLM's --middleware) covers every route but /health.
    Every route vLLM's app lists in its own OpenAPI document is asked without the key, and with a wrong one."""
    fleet = state["fleet"]
    url = fleet.endpoints()["instances"][0]["url"]
    req = urllib.request.Request(url + "/openapi.json", headers={"Authorization": f"Bearer {fleet.key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        routes = {(path, method.upper()) for path, ops in json.loads(resp.read())["paths"].items() for method in ops}
    assert ("/invocations", "POST") in routes and ("/tokenize", "POST") in routes  # the ones --api-key left open
    assert len(routes) > 15
    opened = []
    for path, method in sorted(routes | {("/openapi.json", "GET"), ("/metrics", "GET"), ("/docs", "GET")}):
        if "{" in path:
            path = path.split("{")[0] + "x"
        for key in (None, "wrong"):
            req = urllib.request.Request(url + path, method=method, data=b"{}" if method == "POST" else None,
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {key}"} if key else {})})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    code = resp.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            if code != 401 and path != "/health":
                opened.append((method, path, key, code))
    assert not opened, f"answered without the key: {opened}"
    code, _ = post(url + "/health", {}, None)
    assert code in (200, 405)  # open: the health gate's and the agent's liveness probe


def gateway_served(fleet, url) -> dict[str, int]:
    req = urllib.request.Request(url + "/aegis/status", headers={"Authorization": f"Bearer {fleet.key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return {i["name"]: i["served"] for i in json.loads(resp.read())["runs"][0]["instances"]}


def test_the_gateway_spreads_requests_and_needs_the_key(state):
    """Issue 15: one URL (`aegis endpoints --format url`) over both real vLLM instances, key-checked."""
    fleet = state["fleet"]
    url = aegis("endpoints", fleet.run_dir, "--format", "url").stdout.strip()
    state["gateway"] = url
    assert post(url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}, None)[0] == 401
    assert post(url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}, "wrong")[0] == 401
    codes: list[int] = []

    def client(k: int) -> None:
        for i in range(10):
            codes.append(post(url + "/v1/completions", {"model": "tiny", "prompt": f"{k}-{i} tell me",
                                                          "max_tokens": 4}, fleet.key)[0])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert codes == [200] * 60
    served = gateway_served(fleet, url)
    assert sum(served.values()) >= 60 and min(served.values()) >= 10, served  # both instances took a share
    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {fleet.key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert [m["id"] for m in json.loads(resp.read())["data"]] == ["tiny"]


def test_killed_instance_restarts_while_the_other_serves(state):
    """Also through the gateway: steady (non-streamed) load sees no failed request while one instance is
    killed, restarts and rejoins (requests it was serving are sent again to the other before any byte)."""
    fleet = state["fleet"]
    url = state["gateway"]
    a, b = fleet.endpoints()["instances"]
    codes: list[int] = []
    stop = threading.Event()

    def steady() -> None:
        while not stop.is_set():
            codes.append(post(url + "/v1/completions", {"model": "tiny", "prompt": f"steady {len(codes)}",
                                                          "max_tokens": 16}, fleet.key)[0])

    loader = threading.Thread(target=steady)
    loader.start()
    time.sleep(1.0)
    os.kill(a["pid"], signal.SIGKILL)
    doc = fleet.wait(lambda d: d["instances"][0]["status"] in ("restarting", "unhealthy"), 30,
                     "the dead instance to be noticed")
    assert doc["instances"][1]["status"] == "ready" and doc["state"] == "degraded"
    # The other instance keeps answering while the first restarts.
    for _ in range(3):
        code, _ = post(b["url"] + "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}, fleet.key)
        assert code == 200
    doc = fleet.wait(lambda d: d["state"] == "ready", 600, "the restarted instance")
    new = doc["instances"][0]
    assert new["pid"] != a["pid"] and new["restarts"] == 1 and new["status"] == "ready"
    rejoined = gateway_served(fleet, url)[a["name"]]
    deadline = time.monotonic() + 60
    while gateway_served(fleet, url)[a["name"]] == rejoined:  # the restarted instance takes requests again
        assert time.monotonic() < deadline, "the restarted instance never rejoined the gateway"
        time.sleep(0.5)
    stop.set()
    loader.join(120)
    assert len(codes) > 10 and set(codes) == {200}, sorted(set(codes))
    # The killed server's own children (engine core, workers) were cleaned up too.
    import psutil
    assert not [p for p in psutil.process_iter() if _pgid(p) == a["pid"]]


def _pgid(p):
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_shutdown_leaves_no_process(state):
    fleet = state["fleet"]
    assert fleet.processes()
    # Requests in flight through the gateway when shutdown starts finish before the engines are stopped.
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(post(
        state["gateway"] + "/v1/completions", {"model": "tiny", "prompt": "last words", "max_tokens": 200,
                                                 "ignore_eos": True}, fleet.key)[0])) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    out = aegis("shutdown", fleet.run_dir, "--timeout", "120").stdout
    assert "stopped" in out
    for t in threads:
        t.join(60)
    assert codes == [200] * 3
    fleet.proc.wait(30)
    assert fleet.proc.returncode == 0
    time.sleep(0.5)
    assert fleet.processes() == []
    doc = fleet.endpoints()
    assert doc["state"] == "stopped" and all(i["status"] == "stopped" for i in doc["instances"])
