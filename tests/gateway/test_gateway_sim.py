"""The gateway over real `aegis launch` runs of simulated engines (no vLLM): two runs behind one URL, a run shut
down mid-load, drain, the run's own gateway (`gateway: true`), keys and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.gateway import GatewayProc, call
from tests.gateway.test_policy import write_endpoints
from tests.launch.fleet import aegis, free_port_block
from tests.launch.test_sim_local import launch_sim

pytestmark = pytest.mark.slow
SIM = {"extra_args": ["--decode-ms", "2"], "startup_timeout": 60, "shutdown_grace": 20}


def served(status: dict) -> dict[str, int]:
    """Requests answered per run (its directory's parent's name, as these tests lay runs out)."""
    out: dict[str, int] = {}
    for r in status["runs"]:
        name = Path(r["run"]).parent.name
        out[name] = out.get(name, 0) + sum(i["served"] for i in r["instances"])
    return out


@pytest.fixture
def two_runs(tmp_path):
    fleets = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        fleets.append(launch_sim(d, d / "run", 2, free_port_block(2), **SIM))
    for f in fleets:
        f.wait(lambda d: d.get("state") == "ready", 90, "2 sim instances ready")
    yield fleets
    for f in fleets:
        if f.proc.poll() is None:
            aegis("shutdown", f.run_dir, "--timeout", "60", check=False)
            f.proc.wait(60)


def test_two_runs_behind_one_gateway_one_shut_down_mid_load(two_runs, tmp_path):
    a, b = two_runs
    key_file = tmp_path / "gw.key"
    # Two runs with two keys: the gateway needs a key of its own (one line otherwise).
    refused = aegis("gateway", a.run_dir, b.run_dir, "--port", "0", check=False)
    assert refused.returncode == 2 and "--key-file" in refused.stderr and "Traceback" not in refused.stderr
    gw = GatewayProc(tmp_path, str(a.run_dir), str(b.run_dir), "--key-file", str(key_file))
    try:
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        key = key_file.read_text().strip()
        assert key not in " ".join(gw.proc.args) and key not in gw.log.read_text()
        assert call(gw.url + "/v1/models", None)[0] == 401
        assert call(gw.url + "/v1/completions", a.key, {"model": "sim-small", "prompt": "x"})[0] == 401
        code, models = call(gw.url + "/v1/models", key)
        assert code == 200 and [(m["id"], m["instances"]) for m in models["data"]] == [("sim-small", 4)]
        assert call(gw.url + "/v1/completions", key, {"model": "nope", "prompt": "x"})[0] == 404
        # Steady load through the gateway with aegis bench, unchanged; run a shuts down in the middle of it.
        bench = subprocess.Popen([sys.executable, "-m", "aegis", "bench", "--url", gw.url, "--api-key-file",
                                  str(key_file), "--model", "sim-small", "--rate", "40", "--num-requests", "400",
                                  "--output-len", "16", "--json", "--output-dir", str(tmp_path / "bench")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        mid = served(gw.status(key))
        assert aegis("shutdown", a.run_dir, "--timeout", "60").returncode == 0
        out, err = bench.communicate(timeout=120)
        assert bench.returncode == 0, err
        summary = json.loads(out)
        assert summary["failed"] == 0 and summary["completed"] == 400, summary
        after = served(gw.status(key))
        assert mid["a"] > 0 and mid["b"] > 0, mid  # both runs took load before a shut down
        assert after["b"] > mid["b"] and after["a"] + after["b"] >= 400, (mid, after)  # (+ bench's /tokenize)
        assert gw.status(key)["runs"][0]["state"] == "stopped"
    finally:
        gw.stop()


def test_the_runs_own_gateway_drain_then_shutdown_lose_nothing(tmp_path):
    port = free_port_block(5)
    fleet = launch_sim(tmp_path, tmp_path / "run", 3, port, gateway=True, gateway_port=port + 4,
                       **{**SIM, "extra_args": ["--decode-ms", "10"]})
    try:
        fleet.wait(lambda d: d.get("state") == "ready", 90, "3 sim instances ready")
        url = aegis("endpoints", fleet.run_dir, "--format", "url").stdout.strip()
        assert url == f"http://127.0.0.1:{port + 4}"  # local-sim serves on the loopback
        key = fleet.key  # one run: the gateway takes the run's own key
        deadline = time.monotonic() + 20
        while call(url + "/health", None)[0] != 200:
            assert time.monotonic() < deadline, (tmp_path / "run" / "logs" / "gateway.log").read_text()
            time.sleep(0.2)
        results: list[int] = []

        def slow(n: int, tokens: int = 100) -> None:  # 100 tokens at 10 ms: about a second in flight
            for _ in range(n):
                code, body = call(url + "/v1/completions", key,
                                  {"model": "sim-small", "prompt": f"slow {time.time()}", "max_tokens": tokens})
                results.append(code if body.get("usage", {}).get("completion_tokens") == tokens or code != 200
                               else -1)

        threads = [threading.Thread(target=slow, args=(2,)) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        insts = call(url + "/aegis/status", key)[1]["runs"][0]["instances"]
        victim = max(range(3), key=lambda k: insts[k]["inflight"])  # the busiest: its requests must finish
        name = insts[victim]["name"]
        assert insts[victim]["inflight"] >= 1, insts
        out = aegis("drain", fleet.run_dir, name, "--timeout", "30").stdout
        assert "idle" in out, out
        status = call(url + "/aegis/status", key)[1]["runs"][0]["instances"][victim]
        assert status["inflight"] == 0 and status["draining"] and not status["serving"]
        fleet.wait(lambda d: d["instances"][victim]["status"] == "draining", 10, "the head to mark it draining")
        for i in range(10):  # new requests go to the other two only
            assert call(url + "/v1/completions", key, {"model": "sim-small", "prompt": f"n{i}", "max_tokens": 2})[0] \
                == 200
        assert call(url + "/aegis/status", key)[1]["runs"][0]["instances"][victim]["served"] == status["served"]
        for t in threads:
            t.join(60)
        assert results == [200] * 12, results
        # Shutdown with requests in flight through the gateway: they finish before the engines are stopped.
        results.clear()
        threads = [threading.Thread(target=slow, args=(1, 600)) for _ in range(4)]  # 6 s: the head sees them
        for t in threads:
            t.start()
        time.sleep(0.4)
        assert aegis("shutdown", fleet.run_dir, "--timeout", "60").returncode == 0
        for t in threads:
            t.join(60)
        assert results == [200] * 4, results
        fleet.proc.wait(30)
        assert "waiting for" in fleet.log.read_text()  # the head waited for the gateway's in-flight requests
        assert not list((fleet.run_dir / "gateways").glob("*.json"))  # the gateway stopped and said so
    finally:
        if fleet.proc.poll() is None:
            aegis("shutdown", fleet.run_dir, "--timeout", "60", check=False)
            fleet.proc.wait(60)
        for p in fleet.processes():
            os.killpg(p.pid, signal.SIGKILL)


def test_bad_gateway_input_is_one_line(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    empty = aegis("gateway", run, check=False)
    assert empty.returncode == 2 and "endpoints file does not exist" in empty.stderr and \
        len(empty.stderr.strip().splitlines()) == 1
    write_endpoints(run, [{"name": "a", "model": "m", "url": "http://127.0.0.1:9", "status": "ready"}])
    (run / "api_key").chmod(0o644)
    shared = aegis("gateway", run, check=False)
    assert shared.returncode == 2 and "chmod 600" in shared.stderr and "Traceback" not in shared.stderr
    (run / "api_key").chmod(0o600)
    wide = aegis("gateway", run, "--host", "0.0.0.0", check=False)
    assert wide.returncode == 2 and "not all interfaces" in wide.stderr
    port = free_port_block(1)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        busy = aegis("gateway", run, "--host", "127.0.0.1", "--port", port, check=False)
    assert busy.returncode == 2 and f"port {port}" in busy.stderr and "in use" in busy.stderr, busy.stderr
    missing = aegis("drain", run, "zzz", check=False)
    assert missing.returncode == 2 and "no instance 'zzz'" in missing.stderr


def test_the_runs_own_gateway_is_started_again(tmp_path):
    """Killed, the run's gateway comes back on the same URL; one whose port is taken is reported once."""
    import socket
    port = free_port_block(4)
    fleet = launch_sim(tmp_path, tmp_path / "run", 1, port, gateway=True, gateway_port=port + 2, **SIM)
    held = socket.socket()
    held.bind(("127.0.0.1", port + 3))
    held.listen()
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = launch_sim(other_dir, other_dir / "run", 1, port + 1, gateway=True, gateway_port=port + 3, **SIM)
    try:
        fleet.wait(lambda d: d.get("state") == "ready", 90, "the instance ready")
        info = fleet.run_dir / "gateway.json"
        deadline = time.monotonic() + 20
        while not info.exists():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        first = json.loads(info.read_text())
        os.kill(first["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            now = json.loads(info.read_text())
            if now["pid"] != first["pid"] and call(now["url"] + "/health", None)[0] == 200:
                break
            assert time.monotonic() < deadline, fleet.log.read_text()
            time.sleep(0.3)
        assert now["url"] == first["url"] == fleet.endpoints()["gateway"]
        assert call(now["url"] + "/v1/completions", fleet.key, {"model": "sim-small", "prompt": "x",
                                                                "max_tokens": 2})[0] == 200
        assert "the gateway exited" in fleet.log.read_text()
        # The other run's gateway port is held by someone else: said once, the run serves without it.
        doc = other.wait(lambda d: d.get("state") == "ready" and d.get("gateway") is None, 90,
                         "the other run ready without its gateway")
        assert other.log.read_text().count("the gateway cannot start") == 1
        assert "in use" in (other.run_dir / "logs" / "gateway.log").read_text()
        assert doc["instances"][0]["status"] == "ready"
    finally:
        held.close()
        for f in (fleet, other):
            if f.proc.poll() is None:
                aegis("shutdown", f.run_dir, "--timeout", "60", check=False)
                f.proc.wait(60)
