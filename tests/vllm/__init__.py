"""Tests proving the CPU vLLM environment (venv, tiny model, real server) works."""
