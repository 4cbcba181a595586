"""Launcher failure paths with real processes: an engine that cannot start, a startup timeout, TP=2."""
import json

import pytest

from tests.launch.fleet import READY_TIMEOUT

pytestmark = pytest.mark.slow


def test_engine_that_keeps_failing_is_marked_failed(fleet_factory, tmp_path):
    import sys
    # This Python has no vLLM: every start fails at once ("No module named vllm").
    fleet = fleet_factory(wait_ready=False, engine_python=sys.executable, max_restarts=2)
    fleet.proc.wait(60)
    assert fleet.proc.returncode == 1
    doc = fleet.endpoints()
    assert doc["state"] == "failed"
    inst = doc["instances"][0]
    assert inst["status"] == "failed" and inst["restarts"] == 2
    assert "after 2 restart(s)" in inst["error"] and "No module named" in inst["error"]
    assert inst["log"] in inst["error"]
    assert fleet.processes() == []


def test_startup_timeout_marks_failed_and_stops(fleet_factory):
    fleet = fleet_factory(wait_ready=False, startup_timeout=3)
    fleet.proc.wait(120)
    assert fleet.proc.returncode == 1
    inst = fleet.endpoints()["instances"][0]
    assert inst["status"] == "failed" and "not healthy after 3 s" in inst["error"]
    assert fleet.processes() == []


def test_tensor_parallel_2_on_two_cores(fleet_factory):
    fleet = fleet_factory(tensor_parallel_size=2)
    inst = fleet.endpoints()["instances"][0]
    assert inst["devices"] == ["0", "1"]
    env = open(f"/proc/{inst['pid']}/environ", "rb").read().split(b"\0")
    assert b"VLLM_CPU_OMP_THREADS_BIND=0|1" in env
    import urllib.request
    req = urllib.request.Request(inst["url"] + "/v1/completions",
                                 data=json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 3}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {fleet.key}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert json.loads(resp.read())["usage"]["completion_tokens"] == 3
