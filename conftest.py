"""Root pytest configuration.

Two loops (the `slow` marker is declared in pyproject.toml):

- `bash tests/run.sh`: everything (installs apt packages, the CPU vLLM, the compiled stage tool,
  starts the test Slurm cluster); what CI runs.
- `python -m pytest -m "not slow"`: the fast development loop. It needs only `pip install -e ".[dev]"`:
  no apt packages, vLLM, Slurm, MPI, sshd, Lmod or compiled tool.

A test that uses one of the fixtures below needs such infrastructure, so it is marked `slow` here even
if its module forgot to: the fast loop never starts a cluster or a vLLM server by accident.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:  # `tests.fixtures...` imports work without an install of the checkout
    sys.path.insert(0, str(REPO))

NEEDS_INFRASTRUCTURE = frozenset({
    "slurm_cluster",   # the real 3-node Slurm cluster (tests/fixtures/slurm.py)
    "vllm_env",        # the CPU vLLM venv and tiny model (tests/fixtures/vllm.py)
    "vllm_server",
    "vllm_servers",
    "fleet_factory",   # launched vLLM fleets (tests/launch/fleet.py)
    "sshd",            # a real OpenSSH server (tests/core/test_remote.py)
})


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if NEEDS_INFRASTRUCTURE.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
