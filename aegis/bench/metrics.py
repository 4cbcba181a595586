"""Serving metrics with vLLM's definitions and key names, from per-request records."""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import cast

import numpy as np

from aegis.bench.records import RequestRecord

PERCENTILES = (50, 90, 95, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")  # per-request latencies: summary keys mean_X_ms, median_X_ms, pNN_X_ms
CLIENT_BOUND_LAG_MS = 5.0


def _stats(name: str, values_ms: list[float], out: dict) -> None:
    arr = np.asarray(values_ms, dtype=float) if values_ms else np.zeros(1)
    out[f"mean_{name}_ms"] = float(arr.mean())
    out[f"median_{name}_ms"] = float(np.median(arr))
    out[f"std_{name}_ms"] = float(arr.std())
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))


def _max_concurrency(records: list[RequestRecord]) -> int:
    events = []
    for r in records:
        events.append((r["sent_s"], 1))
        events.append((r["sent_s"] + r["e2el_ms"] / 1000.0, -1))
    events.sort()
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def segment_duration(records: list[RequestRecord]) -> float:
    """Sum over run segments of (last request end - segment start)."""
    ends: dict[int, float] = defaultdict(float)
    for r in records:
        seg = r.get("segment", 0)
        ends[seg] = max(ends[seg], r["sent_s"] + (r.get("e2el_ms") or 0.0) / 1000.0, r["intended_s"])
    return float(sum(ends.values()))


def offered_rate(records: list[RequestRecord]) -> float | None:
    """The rate the client really offered: 1 / the mean gap between successive sends (within each segment)."""
    sends: dict[int, list[float]] = defaultdict(list)
    for r in records:
        sends[r.get("segment", 0)].append(r["sent_s"])
    gaps = sum(len(v) - 1 for v in sends.values())
    span = sum(max(v) - min(v) for v in sends.values())
    return gaps / span if gaps and span > 0 else None


def samples(ok: list[RequestRecord]) -> dict[str, list[float]]:
    """The values behind each latency's statistics (ms), from successful requests: ttft, tpot, itl, e2el."""
    # A successful request streamed at least one token: its ttft_ms, and past one output token its tpot_ms,
    # are numbers (None only on failures).
    return {"ttft": [cast(float, r["ttft_ms"]) for r in ok],
            "tpot": [cast(float, r["tpot_ms"]) for r in ok if r["output_tokens"] > 1],
            "itl": [x for r in ok for x in r["itl_ms"]],
            "e2el": [r["e2el_ms"] for r in ok]}


def compute(records: list[RequestRecord], duration: float | None = None,
            slo: dict[str, float] | None = None) -> dict:
    """vLLM's benchmark metrics (same keys) plus error kinds and dispatch lag.

    `slo`: the goodput limits, {"ttft"|"tpot"|"e2el": ms} (aegis.bench.slo.parse_goodput).
    """
    if duration is None:
        duration = segment_duration(records)
    duration = max(duration, 1e-9)
    ok = [r for r in records if r["success"]]
    total_in = sum(pt if (pt := r.get("prompt_tokens")) is not None else r["target_prompt_tokens"]
                   for r in ok)
    total_out = sum(r["output_tokens"] for r in ok)
    out: dict = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    if slo:
        good = 0
        for r in ok:
            vals = {"ttft": cast(float, r["ttft_ms"]), "e2el": r["e2el_ms"],
                    "tpot": cast(float, r["tpot_ms"]) if r["output_tokens"] > 1 else 0.0}
            good += all(vals[k] <= v for k, v in slo.items())
        out["request_goodput"] = good / duration
        out["goodput_slo_ms"] = dict(slo)
    for name, values in samples(ok).items():
        _stats(name, values, out)
    out["offered_rate"] = offered_rate(records)
    out["max_concurrent_requests"] = _max_concurrency(ok) if ok else 0
    out["errors_by_kind"] = dict(Counter(r["error_kind"] for r in records if not r["success"]))
    lags = np.asarray([r["dispatch_lag_ms"] for r in records], dtype=float) if records else np.zeros(1)
    out["dispatch_lag_ms"] = {"median": float(np.median(lags)), "p99": float(np.percentile(lags, 99)),
                              "max": float(lags.max())}
    waits = [r.get("queue_wait_ms", 0.0) for r in records]
    out["concurrency_wait_ms"] = {"median": float(np.median(waits)) if waits else 0.0,
                                  "max": float(max(waits)) if waits else 0.0}
    return out


def breakdown(records: list[RequestRecord], key: str, duration: float, slo: dict | None) -> dict:
    """compute() per value of `key` (endpoint, adapter), over the run's duration."""
    groups: dict = defaultdict(list)
    for r in records:
        groups[r.get(key) if r.get(key) is not None else "(base)"].append(r)
    return {str(k): compute(v, duration, slo) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def sessions(records: list[RequestRecord], planned: dict[int, int]) -> dict:
    """Per-session figures of a sessions workload; `planned`: turns of each session.

    A session completed when all its planned turns succeeded; its completion time runs from its first
    turn's send to its last answer's end (think times included): mean_session_ms, p99_session_ms, ...
    """
    turns: dict[int, list[RequestRecord]] = defaultdict(list)
    for r in records:
        if r.get("session") is not None:
            turns[r["session"]].append(r)
    times = []
    for sid, n in planned.items():
        rs = turns.get(sid, [])
        if len(rs) == n and all(r["success"] for r in rs):
            times.append((max(r["sent_s"] + r["e2el_ms"] / 1e3 for r in rs) - min(r["sent_s"] for r in rs)) * 1e3)
    out: dict = {"num_sessions": len(planned), "completed": len(times), "failed": len(planned) - len(times),
                 "turns": sum(planned.values())}
    _stats("session", times, out)
    return out
