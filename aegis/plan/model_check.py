"""Check each model's TP and PP against its own config.json (attention heads, layers) and the site's nodes.

Refused (ConfigError, before anything is written), because the engine would refuse them at start-up:
- tensor_parallel_size that does not divide the attention heads: vLLM's
  ModelConfig.verify_with_parallel_config (vllm/config/model.py) raises "Total number of attention heads
  (64) must be divisible by tensor parallel size (6)"; tensor parallelism gives each rank
  heads / TP heads. ALCF's vLLM guide for Aurora (argonne-lcf/user-guides, docs/aurora/data-science/
  inference/vllm.md) says the same for Llama-3.1-70B: 64 heads, valid TP 1, 2, 4, 8, and using all 12
  tiles is not preferred since 12 does not divide the heads.
- pipeline_parallel_size larger than the hidden layers: vLLM splits the layers over the stages
  (get_pp_indices in vllm/distributed/utils.py), so a stage would get no layer.
Warned (one line on stderr, through the `aegis` logger; the plan goes on):
- no readable config.json: where it was looked for, and that TP/PP were not checked;
- tensor-parallel groups that cross nodes when a layout that keeps them inside a node exists (vLLM's
  docs/serving/parallelism_scaling.md: tensor_parallel_size = GPUs per node, pipeline_parallel_size =
  nodes).
"""
from __future__ import annotations

import logging

from aegis.config.schema import Config, ModelSpec
from aegis.config.sites import Site
from aegis.errors import ConfigError
from aegis.plan.model_config import ModelShape, find_config, read_shape
from aegis.plan.placement import span

log = logging.getLogger("aegis")

NOT_CHECKED = "tensor_parallel_size and pipeline_parallel_size were not checked against the model"
# Warnings already given by this process: a sweep resolves its model once per point, `aegis launch`
# re-plans for its allocation; each says its warning once.
_WARNED: set[str] = set()


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_tp_sizes(heads: int, devices_per_node: int) -> list[int]:
    """TP sizes the heads allow that fit the site's nodes: divisors up to a node, and whole nodes' multiples."""
    return [d for d in divisors(heads) if d <= devices_per_node or d % devices_per_node == 0]


def check_models(cfg: Config, site: Site) -> None:
    """Refuse a model's layout that its engine would refuse (ConfigError); warn (once per process) otherwise."""
    site = site.resolved()
    for spec in cfg.models:
        if spec.engine == "sim":  # the simulator shards nothing
            continue
        shape = _shape(spec, cfg.hf_home)
        if shape is not None:
            check_shape(spec, shape, site)
        _cross_node(spec, shape, site)


def _shape(spec: ModelSpec, hf_home: str | None) -> ModelShape | None:
    """The model's shape; None (and a warning) when it has TP or PP to check but no readable config.json."""
    if spec.tensor_parallel_size == 1 and spec.pipeline_parallel_size == 1:
        return None  # nothing to check
    path, looked = find_config(spec.model, spec.model_source, hf_home)
    once = f"{spec.model}|{looked}"  # a model listed twice (two names) is looked up, and named, once
    if path is None:
        _warn(once, f"model {spec.short_name!r}: no config.json of {spec.model} found "
              f"(looked in {', '.join(looked)}); {NOT_CHECKED}")
        return None
    try:
        shape = read_shape(path)
    except ValueError as why:
        _warn(once, f"model {spec.short_name!r}: cannot read {path} ({why}); {NOT_CHECKED}")
        return None
    missing = [what for what, value, needed in (("num_attention_heads", shape.heads, spec.tensor_parallel_size > 1),
                                                ("num_hidden_layers", shape.layers,
                                                 spec.pipeline_parallel_size > 1))
               if needed and value is None]
    if missing:
        _warn(once, f"model {spec.short_name!r}: {path} has no {' or '.join(missing)}; {NOT_CHECKED}")
    return shape


def check_shape(spec: ModelSpec, shape: ModelShape, site: Site) -> None:
    """ConfigError (one line) when the model's heads or layers refuse its TP or PP."""
    tp, pp, n = spec.tensor_parallel_size, spec.pipeline_parallel_size, site.device_count
    engine = "vLLM" if spec.engine == "vllm" else "the engine"
    if shape.heads is not None and shape.heads % tp:
        sizes = ", ".join(str(d) for d in valid_tp_sizes(shape.heads, n))
        raise ConfigError(f"model {spec.short_name!r}: tensor_parallel_size {tp} does not divide the "
                          f"{shape.heads} attention heads of {spec.model} ({shape.heads_key} in {shape.path}), "
                          f"so {engine} would refuse to start it; TP sizes that fit site {site.name} "
                          f"({n} devices per node): {sizes}")
    if shape.layers is not None and pp > shape.layers:
        raise ConfigError(f"model {spec.short_name!r}: pipeline_parallel_size {pp} is more than the "
                          f"{shape.layers} hidden layers of {spec.model} ({shape.layers_key} in {shape.path}), "
                          f"so a pipeline stage would get no layer; use at most {shape.layers}")


def node_local_layout(spec: ModelSpec, shape: ModelShape | None, devices_per_node: int) -> tuple[int, int] | None:
    """(TP, PP) on the same devices whose tensor-parallel groups stay inside a node, when the instance's
    own groups cross nodes; None when they do not, or no such layout fits the model's heads and layers.

    An instance larger than a node takes `per` devices on each of the fewest nodes that split it evenly
    (placement.span); vLLM numbers its ranks node by node with TP innermost, so a TP group stays inside a
    node exactly when TP divides `per`.
    """
    tp, k = spec.tensor_parallel_size, spec.devices_per_instance
    if k <= devices_per_node:
        return None
    _, per = span(k, devices_per_node)
    if per % tp == 0:
        return None
    heads = shape.heads if shape else None
    layers = shape.layers if shape else None
    for t in sorted(divisors(per), reverse=True):
        if t > 1 and (heads is None or heads % t == 0) and (layers is None or k // t <= layers):
            return t, k // t
    return None


def _cross_node(spec: ModelSpec, shape: ModelShape | None, site: Site) -> None:
    n = site.device_count
    better = node_local_layout(spec, shape, n)
    if better is None:
        return
    tp, k = spec.tensor_parallel_size, spec.devices_per_instance
    nodes, per = span(k, n)
    how = (f"tensor_parallel_size {tp} is larger than the {per} devices this instance gets on each of its "
           f"{nodes} nodes (site {site.name})" if tp > per else
           f"tensor_parallel_size {tp} does not divide the {per} devices this instance gets on each of its "
           f"{nodes} nodes (site {site.name}), so some tensor-parallel groups straddle two nodes")
    message = (f"model {spec.short_name!r}: {how}: their all-reduces cross the network on every layer; "
               f"TP {better[0]} x PP {better[1]} uses the same {k} devices and keeps each tensor-parallel group "
               "inside a node (vLLM's guidance: TP = GPUs per node, PP = nodes)")
    _warn(message, message)


def _warn(key: str, message: str) -> None:
    """Log `message` unless a warning with this key was given already."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s", message)
