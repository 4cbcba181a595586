"""Launcher failure paths with real processes: an engine that cannot start, a startup timeout, TP=2."""
import json
import os
import stat

import pytest

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


def test_tensor_parallel_2_on_two_cores_from_staged_weights(fleet_factory, vllm_env, tmp_path):
    """One TP=2 instance whose weights are first broadcast to node-local storage (aegis stage)."""
    fleet = fleet_factory(tensor_parallel_size=2, model="aegis-test/tiny", name="tiny",
                          model_source=str(vllm_env.model_dir))
    staged = json.loads((fleet.run_dir / "staged.json").read_text())
    import pwd
    private = f"/tmp/aegis-{pwd.getpwuid(os.geteuid()).pw_name}"
    assert staged == {"tiny": {"model": f"{private}/models/tiny"}}
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700  # ours alone (issue 17)
    inst = fleet.endpoints()["instances"][0]
    assert inst["devices"] == ["0", "1"] and inst["model"] == "aegis-test/tiny"
    cmdline = open(f"/proc/{inst['pid']}/cmdline", "rb").read().split(b"\0")
    assert cmdline[cmdline.index(b"--model") + 1] == f"{private}/models/tiny".encode()
    assert "staging" in fleet.log.read_text()
    env = open(f"/proc/{inst['pid']}/environ", "rb").read().split(b"\0")
    assert b"VLLM_CPU_OMP_THREADS_BIND=0|1" in env
    import urllib.request
    req = urllib.request.Request(inst["url"] + "/v1/completions",
                                 data=json.dumps({"model": "aegis-test/tiny", "prompt": "hi",
                                                  "max_tokens": 3}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {fleet.key}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert json.loads(resp.read())["usage"]["completion_tokens"] == 3


def test_missing_model_source_is_one_clear_line(tmp_path):
    import subprocess
    import sys
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"site: local\nmodel: org/m\nmodel_source: {tmp_path}/absent\n")
    for cmd in (["submit", str(cfg), "--run-dir", str(tmp_path / "r")], ["launch", str(cfg), "--run-dir",
                                                                          str(tmp_path / "r2")]):
        proc = subprocess.run([sys.executable, "-m", "aegis", *cmd], capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stderr.strip() == (f"aegis: error: model 'm': model_source {tmp_path}/absent does not exist; "
                                       "fix the path or drop model_source to load the model by id")
        assert not (tmp_path / "r").exists() and not (tmp_path / "r2" / "endpoints.json").exists()
