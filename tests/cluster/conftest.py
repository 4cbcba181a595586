"""Fixtures for the test cluster smoke tests."""
from tests.fixtures.slurm import slurm_cluster  # noqa: F401
