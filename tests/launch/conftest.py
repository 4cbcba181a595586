"""Fixtures for the launcher tests: the real CPU vLLM environment and launched fleets."""
from tests.fixtures.vllm import vllm_env  # noqa: F401
from tests.launch.fleet import fleet_factory  # noqa: F401
