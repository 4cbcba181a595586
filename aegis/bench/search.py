"""The rate search of `aegis probe --search`: judge a rate by its runs' requests, bracket the knee, bisect it.

A rate's runs meet the SLO when every limited percentile (p99 TTFT, ...) of their requests is at
most its limit and no more than 1 % of the requests failed (probe.classify's TOO HIGH). The
decision is statistical: the percentile's 95 % confidence interval (aegis.bench.quantile, from
all the rate's requests pooled) entirely at or under the limit passes, entirely over it fails;
so does an estimate more than `margin` (a fraction of the limit) away from the limit. Anything
else is unclear, and the rate is run again, up to a number of runs; then the pooled estimate
decides and the rate is marked marginal.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aegis.bench import metrics, quantile
from aegis.bench.probe import classify
from aegis.bench.records import RequestRecord
from aegis.bench.slo import split

PASS, FAIL, UNCLEAR = "pass", "fail", "unclear"
STOPS = {  # why a search ended -> what it means for the rate found
    "converged": "the bracket is within the tolerance",
    "client-limited": "the load generator could not offer more (CLIENT-BOUND or CLIENT-STARVED at a rate that "
                      "met the SLO): the server's knee is at least this rate",
    "max-rate": "the next rate would pass --max-rate: the knee is at least this rate",
    "min-rate": "no rate down to the lowest that holds enough requests per point met the SLO",
    "max-points": "--max-points runs of the search were spent before the bracket closed",
    "interrupted": "interrupted",
}


@dataclass(frozen=True)
class Limit:
    """One SLO limit of the search: `metric` (a summary key, e.g. p99_ttft_ms) at most `limit` ms."""

    metric: str
    latency: str  # ttft, tpot, itl, e2el: the samples (metrics.samples) it is a percentile of
    q: float
    limit: float


def limits(slo: dict[str, float]) -> list[Limit]:
    """The search's limits from canonical SLO keys (aegis.bench.slo.search checked them)."""
    out = []
    for key, value in slo.items():
        metric = split(key)[1]
        stat, latency = metric[:-3].split("_", 1)
        out.append(Limit(metric, latency, quantile.stat_quantile(stat), value))
    return out


def check(lim: Limit, values: list[float], estimate: float, margin: float, confidence: float) -> dict:
    """One limit against one rate's pooled values: the estimate, its interval and pass / fail / unclear."""
    low, high = quantile.interval(values, lim.q, confidence)
    if not values:
        decision = FAIL  # nothing to measure: no request of the rate succeeded
    elif high is not None and high <= lim.limit:
        decision = PASS
    elif low is not None and low > lim.limit:
        decision = FAIL
    elif estimate <= lim.limit * (1.0 - margin):
        decision = PASS
    elif estimate > lim.limit * (1.0 + margin):
        decision = FAIL
    else:
        decision = UNCLEAR
    return {"metric": lim.metric, "value": estimate if values else None, "ci_low": low, "ci_high": high,
            "limit": lim.limit, "n": len(values), "decision": decision}


def judge(records: list[RequestRecord], lims: list[Limit], margin: float, confidence: float) -> dict:
    """All of one rate's requests (every run, pooled) against the limits: verdict pass / fail / unclear."""
    s = metrics.compute(records)
    values = metrics.samples([r for r in records if r["success"]])
    checks = [check(lim, values[lim.latency], s[lim.metric], margin, confidence) for lim in lims]
    status = classify(s)
    decisions = {c["decision"] for c in checks}
    if status == "TOO HIGH" or FAIL in decisions:
        verdict = FAIL
    elif decisions == {PASS}:
        verdict = PASS
    else:
        verdict = UNCLEAR
    return {"verdict": verdict, "status": status, "overloaded": status == "TOO HIGH", "checks": checks,
            "completed": s["completed"], "failed": s["failed"]}


def settle(judgement: dict) -> bool:
    """An unclear rate's verdict once its runs are spent: every estimate at most its limit."""
    return not judgement["overloaded"] and all(c["value"] is not None and c["value"] <= c["limit"]
                                               for c in judgement["checks"])


@dataclass
class Verdict:
    """What the search needs to know of a measured rate."""

    passed: bool
    client_limited: bool = False
    interrupted: bool = False


@dataclass
class Outcome:
    """The end of a search: the highest rate that met the SLO, the lowest that did not, and why it stopped."""

    low: float | None
    high: float | None
    stop: str
    points: int


def _round(rate: float) -> float:
    return float(f"{rate:.4g}")


def find(measure: Callable[[float], Verdict], start: float, tolerance: float, max_rate: float, min_rate: float,
         max_points: int) -> Outcome:
    """Double from `start` until a rate fails (halve until one passes), then bisect to high / low - 1 <= tolerance."""
    low: float | None = None
    high: float | None = None
    points = 0
    rate = start
    while True:  # bracketing
        if points >= max_points:
            return Outcome(low, high, "max-points", points)
        v = measure(rate)
        points += 1
        if v.interrupted:
            return Outcome(low, high, "interrupted", points)
        if v.passed:
            low = rate
            if high is not None:
                break
            if v.client_limited:
                return Outcome(low, high, "client-limited", points)
            if rate * 2 > max_rate:
                return Outcome(low, high, "max-rate", points)
            rate = _round(rate * 2)
        else:
            high = rate
            if low is not None:
                break
            if rate / 2 < min_rate:
                return Outcome(low, high, "min-rate", points)
            rate = _round(rate / 2)
    assert low is not None and high is not None  # the bracket closed
    while high / low - 1.0 > tolerance:  # bisection
        mid = _round((low + high) / 2.0)
        if not low < mid < high:
            break
        if points >= max_points:
            return Outcome(low, high, "max-points", points)
        v = measure(mid)
        points += 1
        if v.interrupted:
            return Outcome(low, high, "interrupted", points)
        if v.passed:
            low = mid
            if v.client_limited:
                return Outcome(low, high, "client-limited", points)
        else:
            high = mid
    return Outcome(low, high, "converged", points)
