"""Inference engines: how to start one, where its readiness and metrics are."""
from aegis.engines.base import Engine, EngineLaunch
from aegis.engines.options import ENGINE_NAMES, EngineOptions, LoraOptions
from aegis.engines.sglang import SGLangEngine
from aegis.engines.sim import SimEngine
from aegis.engines.trtllm import TRTLLMEngine
from aegis.engines.vllm import VLLMEngine

ENGINES = {"vllm": VLLMEngine, "sglang": SGLangEngine, "trtllm": TRTLLMEngine, "sim": SimEngine}
assert tuple(ENGINES) == ENGINE_NAMES


def get_engine(name: str) -> Engine:
    return ENGINES[name]()


def multinode_backend(spec, site) -> str:
    """How an instance of `spec` that spans nodes is started: the model's multinode_backend, else the site's, else
    the engine's native mode."""
    return spec.multinode_backend or site.multinode_backends.get(spec.engine, "native")


def engine_options(spec, site) -> EngineOptions:
    """The model's engine options with the multi-node backend decided (`multinode_backend`)."""
    return spec.engine_options().model_copy(update={"multinode_backend": multinode_backend(spec, site)})


def check_engine_site(spec, site) -> None:
    """Refuse (ConfigError, one line) a model whose engine cannot drive the site's devices."""
    from aegis.errors import ConfigError

    engine = get_engine(spec.engine)
    why = engine.check_site(list(site.visibility_env))
    if why is None and site.devices_per_node != "auto" and spec.devices_per_instance > site.devices_per_node:
        why = engine.check_multinode(engine_options(spec, site), site.device_kind)
    if why:
        raise ConfigError(f"model {spec.short_name!r} on site {site.name!r}: {why}")


__all__ = ["Engine", "EngineLaunch", "EngineOptions", "LoraOptions", "check_engine_site", "engine_options",
           "get_engine", "multinode_backend"]
