"""The CPU vLLM fixture for the sweep run-mode tests."""
from tests.fixtures.vllm import vllm_env  # noqa: F401
