"""Fixtures for the engine tests: the real CPU vLLM environment."""
from tests.fixtures.vllm import vllm_env  # noqa: F401
