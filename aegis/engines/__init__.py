"""Inference engines: how to start one, where its readiness and metrics are."""
from aegis.engines.base import Engine, EngineLaunch
from aegis.engines.vllm import VLLMEngine

ENGINES = {"vllm": VLLMEngine}


def get_engine(name: str) -> Engine:
    return ENGINES[name]()


__all__ = ["Engine", "EngineLaunch", "get_engine"]
