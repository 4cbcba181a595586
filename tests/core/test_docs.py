"""Every `$ aegis ...` command shown in the README and docs/ runs as written."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Commands that need a cluster, MPI ranks or a running server are covered by their own tests.
NEEDS_MORE = ("aegis submit ", "aegis stage", "aegis bench", "aegis probe", "aegis smoke", "aegis launch",
              "aegis status", "aegis cancel", "aegis health", "aegis endpoints", "aegis shutdown",
              "aegis warm", "aegis sweep", "aegis report", "aegis size", "module ")


def commands():
    out = []
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            m = re.match(r"^\$ (aegis .*)$", line.strip())
            if not m:
                continue
            cmd = m.group(1)
            if cmd.startswith(NEEDS_MORE) and "--dry-run" not in cmd:
                continue
            out.append(pytest.param(cmd, id=f"{doc.name}: {cmd}"))
    return out


@pytest.mark.parametrize("cmd", commands())
def test_documented_command_runs(cmd):
    argv = [sys.executable, "-m", "aegis"] + shlex.split(cmd)[1:]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_examples_plan_and_render(tmp_path):
    for cfg in sorted((REPO / "examples").glob("*.yaml")):
        for sub in (["plan"], ["submit", "--dry-run", "--run-dir", str(tmp_path / "r")]):
            proc = subprocess.run([sys.executable, "-m", "aegis", *sub, str(cfg)], capture_output=True,
                                  text=True, cwd=REPO)
            assert proc.returncode == 0, f"{cfg.name}: {proc.stderr}"


def test_readme_names_the_test_command():
    text = (REPO / "README.md").read_text()
    assert "bash tests/run.sh" in text
    assert "tests/run.sh" in (REPO / ".ci" / "run").read_text()
