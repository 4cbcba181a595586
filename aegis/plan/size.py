"""`aegis size`: instances and nodes to finish W tokens by a deadline, and the smallest TP that fits a model.

Memory model (per device, tensor parallel size TP, pipeline parallel size PP):
  weights  = params x bytes(dtype) / (TP x PP)
  KV cache = 2 (K and V) x layers x kv_heads x head_dim x bytes(kv dtype) x max_model_len x sequences
             / (min(TP, kv_heads) x PP)      (KV heads are split over TP ranks, replicated beyond kv_heads)
  fits when weights + KV cache + overhead_gb <= device_memory_gb x gpu_memory_utilization.
Without --num-layers/--num-kv-heads/--head-dim a rule of thumb fills them in: a dense decoder with
params ~= 12 x layers x hidden^2 and hidden = 128 x layers (Llama-like shape) gives
hidden = (params x 128 / 12)^(1/3), layers = hidden / 128; grouped-query attention with 8 KV
heads of dimension 128 (Llama-3, Qwen-2, Mistral). Give the real values for exact figures.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from aegis.errors import UsageError
from aegis.plan.placement import span

BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2,
         "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1, "int4": 0.5, "fp4": 0.5}
MAX_PP = 64


def instances_needed(tokens: float, tok_per_s: float, hours: float) -> int:
    """ceil(W / (per-instance tok/s x 3600 x hours))."""
    return max(1, math.ceil(tokens / (tok_per_s * 3600.0 * hours) - 1e-12))


def nodes_for(instances: int, devices_per_instance: int, devices_per_node: int) -> int:
    if devices_per_instance <= devices_per_node:
        return math.ceil(instances / (devices_per_node // devices_per_instance))
    return instances * span(devices_per_instance, devices_per_node)[0]


def throughput_of(value: str, metric: str = "output_throughput") -> float:
    """Per-instance tokens/s: a number, a bench summary.json, a probe search's search.json (the rate it found),
    either's directory, or a report's summary.csv."""
    try:
        tps = float(value)
    except ValueError:
        tps = _throughput_from_file(Path(value), metric)
    if not tps > 0 or math.isinf(tps):
        raise UsageError(f"--throughput must be a positive number of tokens/s per instance (got {value})")
    return tps


def node_hour_rate(value: str) -> float | None:
    """Generated tokens per node-hour measured by an `aegis serve` chain (its directory or service.json);
    None when `value` is not one."""
    from aegis.serve.chain import ServiceDir

    path = Path(value)
    sdir = ServiceDir(path.parent if path.name == "service.json" else path)
    if not sdir.record.is_file():
        return None
    rate = sdir.read().tokens_per_node_hour()
    if not rate:
        raise UsageError(f"{value}: the service counted no generated tokens yet (its jobs' engines are read when "
                         "aegis ends them); give a tokens/s figure instead")
    return rate


def node_hours_needed(tokens: float, tok_per_s: float, devices_per_instance: int, devices_per_node: int) -> float:
    """Node-hours one instance type needs for `tokens`: instance-hours x the nodes an instance occupies
    (a share of one node when several fit on it, whole nodes when it spans)."""
    if devices_per_instance <= devices_per_node:
        per_instance = 1.0 / (devices_per_node // devices_per_instance)  # devices left over on a node are idle
    else:
        per_instance = float(math.ceil(devices_per_instance / devices_per_node))
    return tokens / (tok_per_s * 3600.0) * per_instance


def _throughput_from_file(path: Path, metric: str) -> float:
    from aegis.bench.probe_search import SEARCH_FILE
    if path.is_dir():
        for name in ("summary.json", SEARCH_FILE, "summary.csv"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UsageError(f"--throughput {path}: no summary.json (bench), {SEARCH_FILE} (aegis probe --search) "
                             "or summary.csv (report) in it")
    if not path.is_file():
        raise UsageError(f"--throughput {path}: neither a number nor an existing file")
    if path.suffix == ".csv":
        import csv
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("passed") == "1" and r.get(metric)]
        if not rows:
            raise UsageError(f"--throughput {path}: no run in this report meets its SLO")
        best = rows[0]  # the report ranks passing runs first, best first
        per = float(best[metric]) / max(1.0, float(best.get("endpoints") or 1))
        return per
    try:
        s = json.loads(path.read_text())
    except ValueError:
        raise UsageError(f"--throughput {path}: not a JSON bench summary") from None
    if path.name == SEARCH_FILE:
        found = s.get("found") if isinstance(s, dict) else None
        if not found:
            raise UsageError(f"--throughput {path}: the search found no rate that meets its SLO")
        return float(found[metric]) / max(1, int(s.get("endpoints") or 1))
    if metric not in s:
        raise UsageError(f"--throughput {path}: has no {metric}")
    return float(s[metric]) / max(1, len(s.get("endpoints") or [None]))


def model_shape(params: float, layers: int | None, kv_heads: int | None, head_dim: int | None):
    """(layers, kv_heads, head_dim): given values, else the rule of thumb in the module docstring."""
    if layers is None:
        hidden = (params * 128.0 / 12.0) ** (1.0 / 3.0)
        layers = max(1, round(hidden / 128.0))
    return layers, kv_heads or 8, head_dim or 128


def fit_tp(params: float, dtype: str, max_model_len: int, device_gb: float, devices_per_node: int, *,
           layers=None, kv_heads=None, head_dim=None, kv_dtype=None, seqs: int = 1,
           utilization: float = 0.9, overhead_gb: float = 2.0) -> dict:
    """The smallest TP (powers of two up to a node), then TP = node x PP, that fits weights + KV cache."""
    if dtype not in BYTES or (kv_dtype or dtype) not in BYTES:
        bad = dtype if dtype not in BYTES else kv_dtype
        raise UsageError(f"unknown dtype {bad!r}; choose from {', '.join(BYTES)}")
    layers, kv_heads, head_dim = model_shape(params, layers, kv_heads, head_dim)
    kv_per_token = 2 * layers * kv_heads * head_dim * BYTES[kv_dtype or dtype]
    weights = params * BYTES[dtype]
    kv = kv_per_token * max_model_len * seqs
    usable = device_gb * 1e9 * utilization - overhead_gb * 1e9
    if usable <= 0:
        raise UsageError(f"{device_gb:g} GB x {utilization:g} leaves nothing after {overhead_gb:g} GB overhead")
    tps = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= devices_per_node]
    options = [(t, 1) for t in tps] + [(tps[-1], pp) for pp in range(2, MAX_PP + 1)]
    for tp, pp in options:
        need = weights / (tp * pp) + kv / (min(tp, kv_heads) * pp) + overhead_gb * 1e9
        if need <= device_gb * 1e9 * utilization:
            spare = device_gb * 1e9 * utilization - need
            extra_seqs = int(spare * min(tp, kv_heads) * pp // (kv_per_token * max_model_len))
            return {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "devices": tp * pp,
                    "nodes": math.ceil(tp * pp / devices_per_node), "per_device_gb": need / 1e9,
                    "weights_gb": weights / 1e9, "kv_cache_gb": kv / 1e9, "kv_bytes_per_token": kv_per_token,
                    "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
                    "usable_gb": device_gb * utilization, "extra_sequences": extra_seqs}
    raise UsageError(f"{params:g} parameters in {dtype} with {max_model_len} tokens of context do not fit "
                     f"in {MAX_PP} nodes of {devices_per_node} x {device_gb:g} GB; use a smaller dtype or context")


def site_facts(site_name: str | None, device_gb: float | None) -> tuple[int | None, float | None, str]:
    if site_name is None:
        return None, device_gb, ""
    from aegis.config.sites import load_site
    site = load_site(site_name).resolved()
    if device_gb is None:
        device_gb = site.device_memory_gb
        if device_gb is None and site.device_kind == "cpu":
            import psutil
            device_gb = psutil.virtual_memory().total / 1e9 / site.device_count
    return site.device_count, device_gb, site.name
