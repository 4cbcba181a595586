"""The README's main job, `aegis demo`, as a user runs it: real CPU vLLM, answers, a clean shutdown."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.fixtures.vllm import run_processes

pytestmark = pytest.mark.slow


def test_demo_serves_answers_and_shuts_down(vllm_env, tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "aegis", "demo", "--instances", "1", "--requests", "2",
                           "--runs-dir", str(runs)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [line for line in proc.stdout.splitlines() if re.match(r"^tiny-0: \".*\" \(\d+ ms\)$", line)]
    assert len(answers) == 2, proc.stdout
    assert answers[0].startswith('tiny-0: "The cluster said') and "aegis demo: shut down cleanly" in proc.stdout
    (run,) = list(runs.iterdir())
    doc = json.loads((run / "endpoints.json").read_text())
    assert doc["state"] == "stopped" and [i["status"] for i in doc["instances"]] == ["stopped"]
    assert not run_processes(run), "the demo left processes of its run behind"
