"""Fixtures for the CPU vLLM environment tests."""
from tests.fixtures.vllm import vllm_env, vllm_server, vllm_servers  # noqa: F401
