"""Fixtures for the scheduler integration tests: the real 3-node Slurm cluster, the CPU vLLM, a stuck engine."""
import os
import subprocess

import pytest

from tests.fixtures.slurm import slurm_cluster  # noqa: F401
from tests.fixtures.vllm import vllm_env  # noqa: F401


@pytest.fixture
def sleeper(tmp_path):
    """An "engine" that never becomes healthy: keeps a job running until it is cancelled."""
    path = tmp_path / "sleeper-engine"
    path.write_text("#!/bin/sh\nexec sleep 600\n")
    path.chmod(0o755)
    return path


def _job_ids(env):
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env).stdout
    return {int(j) for j in out.split() if j.isdigit()}


@pytest.fixture(autouse=True)
def cancel_leftover_jobs(request):
    """Whatever a test submitted is cancelled when it ends, also when it failed half-way."""
    if "slurm_cluster" not in request.fixturenames:
        yield
        return
    cluster = request.getfixturevalue("slurm_cluster")
    env = {**os.environ, **cluster.env}
    before = max(_job_ids(env) | {0})
    yield
    left = sorted(j for j in _job_ids(env) if j > before)
    if left:
        subprocess.run(["scancel", *map(str, left)], env=env)
