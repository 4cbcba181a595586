"""PNG plots of a report: throughput vs latency, TTFT vs arrival rate, Pareto front, Prometheus series."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from aegis.errors import UsageError
from aegis.report.analyze import Verdict, pareto_front

MAX_SERIES = 12  # Prometheus runs drawn (the best ones)


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'aegis-hpc[plots]' (or use --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def throughput_latency(verdicts: list[Verdict], out: Path) -> Path | None:
    plt = _plt()
    runs = [v for v in verdicts if "output_throughput" in v.run.metrics]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    by_config = defaultdict(list)
    for v in runs:
        by_config[v.run.config].append(v)
    for ax, metric, title in ((axes[0], "p95_ttft_ms", "p95 TTFT (ms)"), (axes[1], "median_e2el_ms",
                                                                            "median end-to-end latency (ms)")):
        for name, group in by_config.items():
            group = sorted(group, key=lambda v: v.run.rate or 0)
            xs = [v.run.metrics.get(metric, 0.0) for v in group]
            ys = [v.run.metrics["output_throughput"] for v in group]
            line, = ax.plot(xs, ys, marker="o", linestyle="-" if len(group) > 1 else "none", label=name)
            for v, x, y in zip(group, xs, ys):
                if not v.passed:
                    ax.plot([x], [y], marker="x", color="red", markersize=10)
        ax.set_xlabel(title)
        ax.set_ylabel("output throughput (tok/s)")
        ax.grid(alpha=0.3)
    axes[0].set_title("throughput vs latency (red x: fails the SLO)")
    axes[1].legend(fontsize=7, loc="best")
    return _save(fig, out / "throughput_vs_latency.png")


def ttft_vs_rate(verdicts: list[Verdict], out: Path) -> Path | None:
    plt = _plt()
    probes = defaultdict(list)
    for v in verdicts:
        if v.run.kind == "probe":
            probes[v.run.config].append(v.run)
    if not probes:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = (("p50_ttft_ms", ":"), ("p95_ttft_ms", "-"), ("p99_ttft_ms", "--"))
    for i, (name, runs) in enumerate(sorted(probes.items())):
        runs = sorted(runs, key=lambda r: r.rate or 0.0)  # a probe's runs all have a rate
        color = f"C{i % 10}"
        for metric, style in styles:
            ax.plot([r.rate for r in runs], [r.metrics.get(metric, float("nan")) for r in runs], style,
                    marker="o", color=color, label=f"{name} {metric[:3]}")
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT percentiles vs arrival rate (dotted p50, solid p95, dashed p99)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / "ttft_vs_rate.png")


def pareto(verdicts: list[Verdict], out: Path) -> Path | None:
    plt = _plt()
    runs = [v for v in verdicts if {"output_throughput_per_device", "output_tokens_per_s_per_user"}
            <= set(v.run.metrics)]
    if not runs:
        return None
    pts = [(v.run.metrics["output_tokens_per_s_per_user"], v.run.metrics["output_throughput_per_device"])
           for v in runs]
    fig, ax = plt.subplots(figsize=(8, 5))
    for v, (x, y) in zip(runs, pts):
        ax.plot([x], [y], marker="o" if v.passed else "x", color="C0" if v.passed else "red")
        ax.annotate(v.run.name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-", color="C2", label="Pareto front")
    ax.set_xlabel("output tokens/s per user (1000 / median TPOT)")
    ax.set_ylabel("output tokens/s per device")
    ax.set_title("Pareto front: throughput per device vs speed per user")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out / "pareto.png")


def _series(path: str) -> dict[str, list[float]]:
    cols = defaultdict(list)
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("endpoint") != "ALL" or row.get("ok") != "1":
                continue
            for key in ("time_s", "running", "waiting", "kv_cache_usage_perc"):
                try:
                    cols[key].append(float(row[key]))
                except (TypeError, ValueError):
                    cols[key].append(float("nan"))
    return cols


def prometheus(verdicts: list[Verdict], out: Path) -> Path | None:
    plt = _plt()
    csvs = [(v.run, v.run.prom_csv) for v in verdicts if v.run.prom_csv][:MAX_SERIES]
    data = [(r, _series(p)) for r, p in csvs]
    data = [(r, s) for r, s in data if s.get("time_s")]
    if not data:
        return None
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for run, s in data:
        axes[0].plot(s["time_s"], s["running"], label=run.name)
        axes[1].plot(s["time_s"], s["waiting"])
        axes[2].plot(s["time_s"], [100 * x for x in s["kv_cache_usage_perc"]])
    for ax, label in zip(axes, ("running requests", "waiting requests", "KV cache usage (%)")):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("time since the run's start (s)")
    axes[0].set_title("server metrics (Prometheus, summed over endpoints)")
    axes[0].legend(fontsize=7, ncol=3)
    return _save(fig, out / "prometheus.png")


def search_curve(doc: dict, path: str | Path) -> Path:
    """`aegis probe --search`'s points: each limited percentile against the rate, its interval and limit."""
    plt = _plt()
    points = sorted((p for p in doc["points"] if not p["interrupted"]), key=lambda p: p["rate"])
    metrics = [c["metric"] for c in points[0]["checks"]]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 3.2 * len(metrics)), sharex=True, squeeze=False)
    for i, (ax, metric) in enumerate(zip(axes[:, 0], metrics)):
        xs = [p["rate"] for p in points]
        cs = [p["checks"][i] for p in points]
        ys = [c["value"] if c["value"] is not None else float("nan") for c in cs]
        known = [v for c in cs for v in (c["value"], c["ci_low"], c["ci_high"], c["limit"]) if v and v > 0]
        bottom, top = min(known) / 1.5, max(known) * 1.5
        ax.plot(xs, ys, "-", color="C0", alpha=0.5)
        for p, c, x, y in zip(points, cs, xs, ys):
            low = c["ci_low"] if c["ci_low"] is not None else bottom
            ax.vlines(x, low, c["ci_high"] if c["ci_high"] is not None else top, color="0.6",
                      linestyle="-" if c["ci_high"] is not None else ":")  # dotted: no upper bound yet
            ok = p["verdict"] == "pass"
            ax.plot([x], [y], marker="o" if ok else "x", color="C2" if ok else "red", markersize=7)
        ax.axhline(cs[0]["limit"], linestyle="--", color="red", label=f"limit {cs[0]['limit']:g} ms")
        if doc.get("found"):
            ax.axvline(doc["found"]["rate"], linestyle=":", color="C2", label=f"found {doc['found']['rate']:g} req/s")
        ax.set_yscale("log")
        ax.set_ylim(bottom, top)
        ax.set_ylabel(f"{metric} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("arrival rate (req/s)")
    axes[0, 0].set_title(f"rate search: percentile and its {100 * doc['confidence']:g}% interval per rate "
                         "(o meets the SLO, x does not)")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def all_plots(verdicts: list[Verdict], out: Path) -> list[Path]:
    made = [f(verdicts, out) for f in (throughput_latency, ttft_vs_rate, pareto, prometheus)]
    _plt().close("all")
    return [p for p in made if p]
