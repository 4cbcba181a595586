"""Fixtures for the bench tests: simulated servers on loopback, the real CPU vLLM server, a CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from aegis.testing.simserver import SimProcess
from tests.fixtures.vllm import vllm_env, vllm_server, vllm_servers  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sim():
    """One default simulated server per test module (call reset() between uses)."""
    with SimProcess("--lora-modules", "lora-a,lora-b,lora-c") as s:
        yield s


@pytest.fixture
def make_sim():
    """Factory for simulated servers with custom flags; all stopped at teardown."""
    started = []

    def start(*args: str) -> SimProcess:
        s = SimProcess(*args).__enter__()
        started.append(s)
        return s
    yield start
    for s in started:
        s.close()


def get_json(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def truth(sim_url: str) -> dict[str, dict]:
    return {t["request_id"]: t for t in get_json(sim_url + "/sim/truth")}


def reset(sim_url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(sim_url + "/sim/reset", data=b"{}"), timeout=10).read()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines() if line.strip()]


def segments(out: Path) -> dict[int, dict]:
    return {s["segment"]: s for s in map(json.loads, (out / "segments.jsonl").read_text().splitlines())}


def aegis(*args: str, env: dict | None = None, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `aegis` CLI (python -m aegis) and capture its output."""
    e = dict(os.environ)
    e.pop("AEGIS_API_KEY", None)
    e.pop("OPENAI_API_KEY", None)
    e.update(env or {})
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "aegis", *args], capture_output=True, text=True, env=e,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"aegis {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p
