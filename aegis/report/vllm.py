"""Read `vllm bench serve --save-result` files as report runs, next to aegis's own.

vLLM (vllm/benchmarks/serve.py, where it builds `result_json`) writes one JSON object per run:
its settings first ("date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id",
"num_prompts", metadata, "request_rate" (a number or "inf"), "burstiness", "max_concurrency"),
then the benchmark's result: "duration", "completed", "failed", "total_input_tokens",
"total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
"total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests", and per
latency (ttft, tpot, itl, e2el) "mean_X_ms", "median_X_ms", "std_X_ms", "pNN_X_ms" -- the
names aegis's summary.json uses, so they map onto themselves. `--append-result` adds further
objects to the file, one per line.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from aegis.report.collect import Run, summary_metrics

SNIFF = b'{"date": '  # result_json's first key: how a result file starts (json.dump, insertion order)
REQUIRED = ("date", "model_id", "duration", "completed")
AEGIS_ONLY = ("dispatch_lag_p99_ms", "client_bound", "client_starved", "endpoints")  # aegis's client, not vLLM's
KIND = "vllm"


def is_result(path: Path) -> bool:
    """Whether `path` starts like a `vllm bench serve --save-result` file (reads a few bytes)."""
    if path.suffix != ".json" or path.name.endswith(".pytorch.json"):
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(len(SNIFF)) == SNIFF
    except OSError:
        return False


def read_results(path: Path) -> list[dict]:
    """The result objects in the file (one, or one per line after --append-result); [] when it holds none."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    try:
        docs = [json.loads(text)]
    except ValueError:
        try:
            docs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            return []
    return [d for d in docs if isinstance(d, dict) and all(k in d for k in REQUIRED)]


def rate_of(result: dict) -> float | None:
    """The request rate vLLM was asked for (None: "inf", all at once)."""
    rate = result.get("request_rate")
    return float(rate) if isinstance(rate, (int, float)) and math.isfinite(rate) else None


def runs(path: Path, devices: int | None) -> list[Run]:
    """One report run per result in the file, named after the file (and its line, when it holds several)."""
    results = read_results(path)
    out = []
    for i, r in enumerate(results, 1):
        m = summary_metrics(r, devices)
        for key in AEGIS_ONLY:
            m.pop(key, None)
        if "failed" not in r:  # pooling models' results count no failures: the success rate is unknown
            m.pop("success_pct", None)
        notes = [f"{r['failed']} failed requests"] if r.get("failed") else []
        name = path.stem if len(results) == 1 else f"{path.stem}#{i}"
        out.append(Run(config=name, kind=KIND, path=str(path), metrics=m, rate=rate_of(r), devices=devices,
                       notes=notes))
    return out
