"""Runs `aegis probe --search`: bench runs per rate as the search asks, and search.json/.csv/.jsonl/.png."""
from __future__ import annotations

import copy
import csv
import importlib.util
import io
import json
import os
from dataclasses import dataclass, replace

from aegis.bench import search
from aegis.bench.records import read_records
from aegis.bench.repeat import CONFIDENCE
from aegis.bench.runner import REQUESTS_FILE, BenchConfig, Run
from aegis.bench.slo import describe
from aegis.util.fs import atomic_write

SEARCH_FILE = "search.json"
SEARCH_CSV = "search.csv"
SEARCH_JSONL = "search.jsonl"
SEARCH_PLOT = "search.png"
MIN_REQUESTS = 10  # fewest requests a point's run may plan: the search goes no lower than this over --duration
THROUGHPUTS = ("request_throughput", "output_throughput", "total_token_throughput")


@dataclass
class SearchSpec:
    """The search's settings (command-line options of `aegis probe --search`)."""

    slo: dict[str, float]  # canonical limits (aegis.bench.slo.parse_search)
    start: float = 1.0
    tolerance: float = 0.05
    max_repeats: int = 3
    margin: float = 0.1
    max_rate: float = 1e6
    max_points: int = 30


def min_rate(duration: float) -> float:
    """The lowest rate a point may run at: MIN_REQUESTS over the point's duration."""
    return MIN_REQUESTS / duration


class Search:
    """One `aegis probe --search` into base.output_dir."""

    def __init__(self, base: BenchConfig, spec: SearchSpec, api_key: str | None, echo, progress: bool | None):
        self.base, self.spec, self.api_key, self.echo, self.progress = base, spec, api_key, echo, progress
        self.dir = base.output_dir
        self.limits = search.limits(spec.slo)
        self.points: list[dict] = []

    def run(self) -> dict:
        os.makedirs(self.dir, exist_ok=True)
        assert self.base.duration is not None  # the probe's --duration
        self.echo(f"Searching for the highest rate with {describe(self.spec.slo)} (ms), "
                  f"{self.base.duration:g} s per run")
        outcome = search.find(self._measure, self.spec.start, self.spec.tolerance, self.spec.max_rate,
                              min_rate(self.base.duration), self.spec.max_points)
        doc = self._write(outcome)
        if importlib.util.find_spec("matplotlib") is None:
            self.echo(f"No plot: matplotlib is not installed (pip install 'aegis-hpc[plots]'); the curve is in "
                      f"{SEARCH_CSV}")
        elif self.points:
            from aegis.report.plots import search_curve
            search_curve(doc, os.path.join(self.dir, SEARCH_PLOT))
        return doc

    def _measure(self, rate: float) -> search.Verdict:
        runs, pooled, interrupted = [], [], False
        judgement: dict = {}
        for k in range(1, self.spec.max_repeats + 1):
            cfg = copy.deepcopy(self.base)
            cfg.arrival = replace(self.base.arrival, rate=rate, seed=self.base.arrival.seed + k - 1)
            name = f"rate-{rate:g}" + (f"-{k}" if k > 1 else "")
            cfg.output_dir = os.path.join(self.dir, name)
            run = Run(cfg, self.api_key, progress=self.progress)
            s = run.execute()
            pooled += read_records(os.path.join(cfg.output_dir, REQUESTS_FILE))
            entry = {"rate": rate, "repeat": k, "dir": name, "seed": cfg.arrival.seed,
                     "completed": s["completed"], "failed": s["failed"], "offered_rate": s.get("offered_rate"),
                     **{key: s[key] for key in THROUGHPUTS}, **{lim.metric: s[lim.metric] for lim in self.limits},
                     "client_bound": s["client_bound"], "client_starved": s["client_starved"]}
            runs.append(entry)
            with open(os.path.join(self.dir, SEARCH_JSONL), "a") as fh:
                fh.write(json.dumps(entry) + "\n")
            judgement = search.judge(pooled, self.limits, self.spec.margin, CONFIDENCE)
            if run.interrupted:
                interrupted = True
                break
            if judgement["verdict"] != search.UNCLEAR:
                break
        marginal = judgement["verdict"] == search.UNCLEAR
        passed = search.settle(judgement) if marginal else judgement["verdict"] == search.PASS
        client = any(r["client_bound"] or r["client_starved"] for r in runs)
        point = {"rate": rate, "verdict": search.PASS if passed else search.FAIL, "marginal": marginal,
                 "interrupted": interrupted, "status": judgement["status"], "overloaded": judgement["overloaded"],
                 "client_limited": client, "completed": judgement["completed"], "failed": judgement["failed"],
                 "checks": judgement["checks"], "runs": runs,
                 **{key: sum(r[key] for r in runs) / len(runs) for key in THROUGHPUTS}}
        self.points.append(point)
        self.echo(point_line(point))
        self._write(None)
        return search.Verdict(passed, client, interrupted)

    def _write(self, outcome: search.Outcome | None) -> dict:
        """search.json and search.csv as they stand (rewritten whole after each rate)."""
        found = None
        if outcome is not None and outcome.low is not None:
            best = next(p for p in self.points if p["rate"] == outcome.low and not p["interrupted"])
            found = {"rate": best["rate"], **{key: best[key] for key in THROUGHPUTS},
                     "dir": best["runs"][0]["dir"], "marginal": best["marginal"]}
        doc = {
            "slo": self.spec.slo, "slo_text": describe(self.spec.slo), "confidence": CONFIDENCE,
            "margin": self.spec.margin, "tolerance": self.spec.tolerance, "max_repeats": self.spec.max_repeats,
            "start": self.spec.start, "duration": self.base.duration, "model": self.base.model,
            "endpoints": len(self.base.endpoints),
            "status": "running" if outcome is None else ("interrupted" if outcome.stop == "interrupted"
                                                         else "complete"),
            "stop": None if outcome is None else outcome.stop,
            "stop_reason": None if outcome is None else search.STOPS[outcome.stop],
            "found": found,
            "bracket": None if outcome is None else {"low": outcome.low, "high": outcome.high},
            "lower_bound": outcome is not None and outcome.stop in ("client-limited", "max-rate", "max-points"),
            "points": self.points,
        }
        atomic_write(os.path.join(self.dir, SEARCH_FILE), json.dumps(doc, indent=2) + "\n")
        atomic_write(os.path.join(self.dir, SEARCH_CSV), points_csv(self.points, self.limits))
        return doc


def points_csv(points: list[dict], limits: list[search.Limit]) -> str:
    """One row per rate, by rate: verdict, runs, throughputs, and per limit the estimate, interval and limit."""
    cols = ["rate", "verdict", "marginal", "runs", "status", "client_limited", *THROUGHPUTS]
    for lim in limits:
        cols += [lim.metric, f"{lim.metric}_ci_low", f"{lim.metric}_ci_high", f"{lim.metric}_limit"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for p in sorted(points, key=lambda p: p["rate"]):
        row = [f"{p['rate']:g}", p["verdict"], int(p["marginal"]), len(p["runs"]), p["status"],
               int(p["client_limited"]), *(repr(p[key]) for key in THROUGHPUTS)]
        for c in p["checks"]:
            row += ["" if c[k] is None else repr(c[k]) for k in ("value", "ci_low", "ci_high")] + [f"{c['limit']:g}"]
        w.writerow(row)
    return buf.getvalue()


def _num(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def point_line(p: dict) -> str:
    """'  12 req/s  PASS  p99_ttft_ms 45.1 [95% CI 40.2..-] <= 500  (1 run)'."""
    checks = "; ".join(f"{c['metric']} {_num(c['value'])} [CI {_num(c['ci_low'])}..{_num(c['ci_high'])}] "
                       f"{'<=' if c['value'] is not None and c['value'] <= c['limit'] else '>'} {c['limit']:g}"
                       for c in p["checks"])
    notes = [f"{len(p['runs'])} run{'s' if len(p['runs']) > 1 else ''}"]
    if p["marginal"]:
        notes.append("marginal: decided by the estimate")
    if p["overloaded"]:
        notes.append(f"{p['failed']} failed requests")
    if p["client_limited"]:
        notes.append("client-limited")
    if p["interrupted"]:
        notes.append("interrupted")
    return f"{p['rate']:>10g} req/s  {p['verdict'].upper():4}  {checks}  ({', '.join(notes)})"


def final_lines(doc: dict) -> list[str]:
    """What the search found, in a few lines."""
    f = doc["found"]
    lines = []
    if f is None:
        lines.append("No rate met the SLO" + (f" (lowest tried: {doc['bracket']['high']:g} req/s)"
                                              if doc["bracket"] and doc["bracket"]["high"] else "") + ".")
    else:
        high = doc["bracket"]["high"]
        within = f", the next tried {high:g} did not" if high is not None else ""
        lines.append(f"Highest rate meeting the SLO: {f['rate']:g} req/s{within}: {f['request_throughput']:.2f} "
                     f"req/s, {f['output_throughput']:.1f} output tok/s served ({doc['endpoints']} endpoint"
                     f"{'s' if doc['endpoints'] != 1 else ''})")
    if doc["stop"] != "converged":
        lines.append(f"Stopped: {doc['stop_reason']}.")
    if any(p["client_limited"] for p in doc["points"]):
        lines.append("! CLIENT-LIMITED at " + ", ".join(f"{p['rate']:g}" for p in doc["points"]
                                                        if p["client_limited"]) + " req/s: see each run's summary")
    return lines
