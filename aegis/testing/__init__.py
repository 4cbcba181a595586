"""Test and demo infrastructure: CPU vLLM set-up, the tiny offline model, the simulated OpenAI server."""
