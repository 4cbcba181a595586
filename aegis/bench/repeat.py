"""`aegis bench --repeat K`: K runs of one configuration, each headline metric's mean with a 95% Student-t interval."""
from __future__ import annotations

import copy
import json
import math
import os

from aegis.bench.report import RESULT_WIDTHS
from aegis.util.tables import format_row

REPEAT_FILE = "repeat.json"
CONFIDENCE = 0.95
# The summary.json keys (vLLM's names) that the repeat summary gives an interval for.
HEADLINE = ("request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
            "offered_rate", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
            "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms",
            "p99_e2el_ms")


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with P(T <= t) = p (bisection on t_cdf)."""
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def interval(values: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean, sample standard deviation and the Student-t confidence interval of the mean of `values`."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci_low": None, "ci_high": None, "ci_half_width": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "ci_half_width": half}


def summarize(summaries: list[dict]) -> dict:
    """The repeat summary: per headline metric the runs' values, mean, std and 95% interval."""
    metrics = {}
    for key in HEADLINE:
        values = [s[key] for s in summaries if isinstance(s.get(key), (int, float))]
        if len(values) == len(summaries) and values:
            metrics[key] = {**interval([float(v) for v in values]), "values": values}
    return {"repeats": len(summaries), "confidence": CONFIDENCE,
            "status": "interrupted" if any(s.get("status") == "interrupted" for s in summaries) else "complete",
            "metrics": metrics}


def run_repeats(cfg, k: int, api_key: str | None, progress: bool | None, echo) -> tuple[dict, bool]:
    """Runs `cfg` k times into OUTPUT_DIR/repeat-<i>/ and writes OUTPUT_DIR/repeat.json; (summary, interrupted)."""
    from aegis.bench.runner import Run
    os.makedirs(cfg.output_dir, exist_ok=True)
    summaries = []
    interrupted = False
    for i in range(1, k + 1):
        c = copy.deepcopy(cfg)
        c.output_dir = os.path.join(cfg.output_dir, f"repeat-{i}")
        run = Run(c, api_key, progress=progress)
        summaries.append(run.execute())
        echo(f"repeat {i}/{k}: {summaries[-1]['completed']} ok, {summaries[-1]['failed']} failed, "
             f"{summaries[-1]['request_throughput']:.2f} req/s  ({c.output_dir})")
        if run.interrupted:
            interrupted = True
            break
    result = summarize(summaries)
    tmp = os.path.join(cfg.output_dir, REPEAT_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, os.path.join(cfg.output_dir, REPEAT_FILE))
    return result, interrupted


def format_repeat(r: dict, out_dir: str | None = None) -> str:
    """One line per headline metric: mean ± half-width and the interval."""
    lines = ["{:=^60}".format(f" {r['repeats']} repeats: mean, {100 * r['confidence']:g}% CI (Student t) ")]
    for key, m in r["metrics"].items():
        if m["ci_half_width"] is None:
            text = f"{m['mean']:.2f}"
        else:
            text = f"{m['mean']:.2f} ± {m['ci_half_width']:.2f}"
        lines.append(format_row((key + ":", text), RESULT_WIDTHS, right=(1,), sep=""))
    lines.append("=" * 60)
    if r["status"] == "interrupted":
        lines.append("INTERRUPTED: the summary covers the repeats that ran")
    if out_dir:
        lines.append(f"Results: {out_dir}")
    return "\n".join(lines)
