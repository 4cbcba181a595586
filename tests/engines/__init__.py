"""Tests of the engine command lines, engine options, prefix-cache warm-up and vLLM features."""
