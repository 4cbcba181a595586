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
from typing import Optional

import click

from aegis.errors import UsageError

BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2,
         "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1, "int4": 0.5, "fp4": 0.5}
# Memory of one scheduler device (GB) per shipped site, used when --device-memory-gb is not given.
DEVICE_MEMORY_GB = {
    "aurora": 64.0,    # Intel Max 1550: 128 GB per GPU, 64 GB per tile (tiles are the devices)
    "frontier": 64.0,  # AMD MI250X: 64 GB per GCD
    "h200": 141.0,     # NVIDIA H200 SXM
    "polaris": 40.0,   # NVIDIA A100 40 GB
}
MAX_PP = 64


def instances_needed(tokens: float, tok_per_s: float, hours: float) -> int:
    """ceil(W / (per-instance tok/s x 3600 x hours))."""
    return max(1, math.ceil(tokens / (tok_per_s * 3600.0 * hours) - 1e-12))


def nodes_for(instances: int, devices_per_instance: int, devices_per_node: int) -> int:
    if devices_per_instance <= devices_per_node:
        return math.ceil(instances / (devices_per_node // devices_per_instance))
    if devices_per_instance % devices_per_node:
        raise UsageError(f"an instance of {devices_per_instance} devices cannot span whole nodes of "
                         f"{devices_per_node}; choose TP x PP as a multiple of {devices_per_node}")
    return instances * devices_per_instance // devices_per_node


def throughput_of(value: str, metric: str = "output_throughput") -> float:
    """Per-instance tokens/s: a number, a bench summary.json (or its directory), or a report's summary.csv."""
    try:
        tps = float(value)
    except ValueError:
        tps = _throughput_from_file(Path(value), metric)
    if not tps > 0 or math.isinf(tps):
        raise UsageError(f"--throughput must be a positive number of tokens/s per instance (got {value})")
    return tps


def _throughput_from_file(path: Path, metric: str) -> float:
    if path.is_dir():
        for name in ("summary.json", "summary.csv"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UsageError(f"--throughput {path}: no summary.json (bench) or summary.csv (report) in it")
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
    if metric not in s:
        raise UsageError(f"--throughput {path}: has no {metric}")
    return float(s[metric]) / max(1, len(s.get("endpoints") or [None]))


def model_shape(params: float, layers: Optional[int], kv_heads: Optional[int], head_dim: Optional[int]):
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


def _site_facts(site_name: Optional[str], device_gb: Optional[float]) -> tuple[Optional[int], Optional[float], str]:
    if site_name is None:
        return None, device_gb, ""
    from aegis.sites import load_site
    site = load_site(site_name).resolved()
    if device_gb is None:
        device_gb = DEVICE_MEMORY_GB.get(site.name)
        if device_gb is None and site.device_kind == "cpu":
            import psutil
            device_gb = psutil.virtual_memory().total / 1e9 / site.devices_per_node
    return site.devices_per_node, device_gb, site.name


@click.command("size")
@click.option("--tokens", type=float, help="Tokens to produce (W).")
@click.option("--deadline", type=float, help="Hours until the work must be done.")
@click.option("--throughput", help="Per-instance tokens/s: a number, a bench result (summary.json or its "
              "directory), or a report's summary.csv (its best run that meets the SLO).")
@click.option("--metric", type=click.Choice(["output_throughput", "total_token_throughput"]),
              default="output_throughput", show_default=True, help="Which tokens W counts (from a result file).")
@click.option("--site", help="Site profile (devices per node, device memory).")
@click.option("--tensor-parallel-size", "--tp", "tp", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--pipeline-parallel-size", "--pp", "pp", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--model-params", type=float, help="Model parameters, e.g. 70e9 (memory fit mode).")
@click.option("--dtype", default="bf16", show_default=True, help="Weight dtype: " + ", ".join(BYTES))
@click.option("--kv-cache-dtype", default=None, help="KV-cache dtype [default: --dtype].")
@click.option("--max-model-len", type=click.IntRange(min=1), help="Context length of one sequence.")
@click.option("--num-seqs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Full-length sequences the KV cache must hold at once.")
@click.option("--num-layers", type=click.IntRange(min=1), default=None, help="Decoder layers [rule of thumb].")
@click.option("--num-kv-heads", type=click.IntRange(min=1), default=None, help="KV heads [8].")
@click.option("--head-dim", type=click.IntRange(min=1), default=None, help="Head dimension [128].")
@click.option("--device-memory-gb", type=float, default=None,
              help="Memory per device [aurora 64, frontier 64, h200 141, polaris 40, local: RAM / cores].")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0.05, 1.0), default=0.9, show_default=True)
@click.option("--overhead-gb", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Activations, graphs and runtime per device.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
def size_cmd(tokens, deadline, throughput, metric, site, tp, pp, model_params, dtype, kv_cache_dtype,
             max_model_len, num_seqs, num_layers, num_kv_heads, head_dim, device_memory_gb,
             gpu_memory_utilization, overhead_gb, as_json):
    """Size a fleet for a token budget and deadline, or find the smallest TP that fits a model."""
    fleet = any(v is not None for v in (tokens, deadline, throughput))
    memory = model_params is not None or max_model_len is not None
    if fleet == memory:
        raise UsageError("give either --tokens/--deadline/--throughput (fleet size) or "
                         "--model-params/--max-model-len (memory fit)")
    dpn, device_gb, site_name = _site_facts(site, device_memory_gb)
    if fleet:
        if tokens is None or deadline is None or throughput is None:
            raise UsageError("fleet sizing needs all of --tokens, --deadline and --throughput")
        if not tokens > 0 or not deadline > 0:
            raise UsageError("--tokens and --deadline must be positive")
        tps = throughput_of(throughput, metric)
        n = instances_needed(tokens, tps, deadline)
        hours = tokens / (tps * 3600.0 * n)
        out = {"instances": n, "tokens_per_s_per_instance": tps, "hours_with_instances": hours,
               "margin_pct": 100.0 * (deadline - hours) / deadline}
        line = (f"{n} instances at {tps:.4g} tok/s each finish {tokens:.4g} tokens in {hours:.3g} h "
                f"(deadline {deadline:g} h, margin {out['margin_pct']:.1f} %)")
        if dpn:
            k = tp * pp
            nodes = nodes_for(n, k, dpn)
            fit = nodes * (dpn // k) if k <= dpn else n
            out.update({"site": site_name, "nodes": nodes, "devices_per_instance": k, "instances_that_fit": fit,
                        "hours_if_nodes_full": tokens / (tps * 3600.0 * fit)})
            line += (f"; on {site_name}: {nodes} nodes ({dpn} devices each, {k} per instance; "
                     f"{fit} instances fit, {out['hours_if_nodes_full']:.3g} h if all run)")
        click.echo(json.dumps(out, indent=2) if as_json else line)
        return
    if model_params is None or max_model_len is None:
        raise UsageError("the memory fit needs both --model-params and --max-model-len")
    if not model_params > 0:
        raise UsageError("--model-params must be positive, e.g. 70e9")
    if device_gb is None:
        raise UsageError("device memory unknown: give --device-memory-gb or a --site with a known device "
                         f"({', '.join(DEVICE_MEMORY_GB)})")
    res = fit_tp(model_params, dtype, max_model_len, device_gb, dpn or 8, layers=num_layers,
                 kv_heads=num_kv_heads, head_dim=head_dim, kv_dtype=kv_cache_dtype, seqs=num_seqs,
                 utilization=gpu_memory_utilization, overhead_gb=overhead_gb)
    res.update({"site": site_name or None, "device_memory_gb": device_gb})
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"TP {res['tensor_parallel_size']} x PP {res['pipeline_parallel_size']} "
               f"({res['devices']} devices, {res['nodes']} node(s)): {res['per_device_gb']:.1f} GB per device of "
               f"{res['usable_gb']:.1f} usable (weights {res['weights_gb']:.1f} GB, KV cache {res['kv_cache_gb']:.1f} GB "
               f"for {num_seqs} x {max_model_len} tokens at {res['kv_bytes_per_token']} B/token: {res['layers']} layers, "
               f"{res['kv_heads']} KV heads x {res['head_dim']}); room for {res['extra_sequences']} more full sequences")
