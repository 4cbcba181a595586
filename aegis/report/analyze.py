"""Apply an SLO to collected runs, rank them by output throughput, and say why the others failed."""
from __future__ import annotations

from dataclasses import dataclass, field

from aegis.bench.slo import violations
from aegis.report.collect import Run

RANK_METRIC = "output_throughput"


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
    reasons += violations(slo, run.metrics)
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
