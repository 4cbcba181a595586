"""`aegis probe`: one bench run per arrival rate, classified OK / UNSTABLE / SLOW / TOO HIGH."""
from __future__ import annotations

import copy
import csv
import json
import os
from dataclasses import replace

from aegis.bench.report import PROBE_HEADER, probe_row
from aegis.bench.runner import BenchConfig, Run

UNSTABLE_RATIO = 5.0      # p99 / median TTFT
SLOW_P99_MS = 10000.0     # p99 TTFT
TOO_HIGH_ERRORS = 0.01    # error rate
PROBE_CSV_COLUMNS = ("rate", "status", "success_pct", "completed", "failed", "output_tokens",
                     "ttft_median_ms", "ttft_p99_ms", "latency_median_ms", "request_throughput",
                     "output_throughput", "dispatch_lag_p99_ms", "client_bound", "client_starved", "output_dir")


def classify(s: dict) -> str:
    """TOO HIGH (errors > 1%), SLOW (p99 TTFT > 10 s), UNSTABLE (p99/median TTFT > 5), else OK."""
    total = s["completed"] + s["failed"]
    if total == 0 or s["completed"] == 0 or s["failed"] / total > TOO_HIGH_ERRORS:
        return "TOO HIGH"
    if s["p99_ttft_ms"] > SLOW_P99_MS:
        return "SLOW"
    if s["median_ttft_ms"] > 0 and s["p99_ttft_ms"] / s["median_ttft_ms"] > UNSTABLE_RATIO:
        return "UNSTABLE"
    return "OK"


def row_from_summary(rate: float, s: dict, out_dir: str) -> dict:
    total = s["completed"] + s["failed"]
    return {"rate": rate, "status": classify(s), "success_pct": 100.0 * s["completed"] / total if total else 0.0,
            "completed": s["completed"], "failed": s["failed"], "output_tokens": s["total_output_tokens"],
            "ttft_median_ms": s["median_ttft_ms"], "ttft_p99_ms": s["p99_ttft_ms"],
            "latency_median_ms": s["median_e2el_ms"], "request_throughput": s["request_throughput"],
            "output_throughput": s["output_throughput"], "dispatch_lag_p99_ms": s["dispatch_lag_ms"]["p99"],
            "client_bound": s["client_bound"], "client_starved": s.get("client_starved", False),
            "errors_by_kind": s["errors_by_kind"], "output_dir": out_dir}


def run_probe(base: BenchConfig, rates: list[float], api_key: str | None, echo, progress: bool | None = None,
              stop_early: bool = False) -> dict:
    """Runs every rate in turn; writes probe.jsonl, probe.csv and probe.json into base.output_dir."""
    os.makedirs(base.output_dir, exist_ok=True)
    rows = []
    echo(PROBE_HEADER)
    jsonl = open(os.path.join(base.output_dir, "probe.jsonl"), "a")
    try:
        for rate in rates:
            cfg = copy.deepcopy(base)
            cfg.arrival = replace(base.arrival, rate=rate)
            cfg.output_dir = os.path.join(base.output_dir, f"rate-{rate:g}")
            run = Run(cfg, api_key, progress=progress)
            s = run.execute()
            row = row_from_summary(rate, s, cfg.output_dir)
            rows.append(row)
            jsonl.write(json.dumps(row) + "\n")
            jsonl.flush()
            echo(probe_row(row))
            if run.interrupted:
                break
            if stop_early and row["status"] in ("TOO HIGH", "SLOW"):
                break
    finally:
        jsonl.close()
    with open(os.path.join(base.output_dir, "probe.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PROBE_CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    ok = [r["rate"] for r in rows if r["status"] == "OK"]
    result = {"rates": rows, "highest_ok_rate": max(ok) if ok else None}
    with open(os.path.join(base.output_dir, "probe.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    return result
