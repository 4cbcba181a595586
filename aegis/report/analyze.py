"""Apply an SLO to collected runs, rank them by output throughput, and say why the others failed."""
from __future__ import annotations

from dataclasses import dataclass, field

from aegis.errors import UsageError
from aegis.report.collect import Run
from aegis.sweep.spec import SLO_RE

RANK_METRIC = "output_throughput"


def parse_slo(text: str) -> dict[str, float]:
    """'max_p95_ttft_ms=2000,min_success_pct=99' -> {...}."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not SLO_RE.match(key.strip()):
            raise UsageError(f"--slo {part!r}: use max_METRIC=VALUE or min_METRIC=VALUE, e.g. max_p95_ttft_ms=2000")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--slo {part!r}: {value!r} is not a number") from None
    return out


@dataclass
class Verdict:
    """A run with its SLO outcome."""

    run: Run
    passed: bool
    reasons: list = field(default_factory=list)


def judge(run: Run, slo: dict[str, float]) -> Verdict:
    reasons = list(run.notes) if run.kind == "missing" or any("failed requests" in n for n in run.notes) else []
    if run.kind == "missing":
        return Verdict(run, False, reasons)
    for key, limit in slo.items():
        bound, metric = SLO_RE.match(key).groups()
        value = run.metrics.get(metric)
        if value is None:
            reasons.append(f"SLO {metric}: not measured")
        elif bound == "max" and value > limit:
            reasons.append(f"SLO {metric} {value:.4g} > {limit:g}")
        elif bound == "min" and value < limit:
            reasons.append(f"SLO {metric} {value:.4g} < {limit:g}")
    preempt = run.metrics.get("prom_num_preemptions_delta")
    if preempt and reasons:  # explains a failure; alone it is not one
        reasons.append(f"{preempt:g} preemptions (KV cache ran out)")
    return Verdict(run, not reasons, reasons)


def rank(runs: list[Run], slo: dict[str, float]) -> list[Verdict]:
    """Passing runs first, each group by output throughput, highest first."""
    verdicts = [judge(r, slo) for r in runs]
    return sorted(verdicts, key=lambda v: (not v.passed, -v.run.metrics.get(RANK_METRIC, -1.0), v.run.name))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better), by x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], float("-inf")
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: points[i][0])
