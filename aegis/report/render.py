"""Write the report files: long and wide CSV, Markdown and HTML with the ranked table."""
from __future__ import annotations

import csv
import html
import io
from pathlib import Path

from aegis.bench.slo import describe
from aegis.report.analyze import Verdict
from aegis.report.collect import startup_metric
from aegis.util.fs import atomic_write

LONG_COLUMNS = ("config", "config_hash", "kind", "rate", "path", "metric", "value")
ID_COLUMNS = ("rank", "config", "config_hash", "kind", "rate", "passed", "reasons", "path")
TABLE = (("output_throughput", "out tok/s", "{:.1f}"), ("output_throughput_per_device", "tok/s/dev", "{:.1f}"),
         ("request_throughput", "req/s", "{:.2f}"), ("p95_ttft_ms", "p95 TTFT ms", "{:.0f}"),
         ("median_tpot_ms", "med TPOT ms", "{:.1f}"), ("success_pct", "success %", "{:.1f}"),
         ("prom_num_preemptions_delta", "preempt", "{:g}"), (startup_metric("ready"), "ready s", "{:.0f}"))


def _csv(rows: list[list], header) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def long_csv(verdicts: list[Verdict]) -> str:
    rows = []
    for v in verdicts:
        r = v.run
        for metric in sorted(r.metrics):
            rows.append([r.config, r.config_hash or "", r.kind, "" if r.rate is None else f"{r.rate:g}", r.path,
                         metric, repr(r.metrics[metric])])
    return _csv(rows, LONG_COLUMNS)


def wide_csv(verdicts: list[Verdict]) -> str:
    metrics = sorted({m for v in verdicts for m in v.run.metrics})
    rows = []
    for i, v in enumerate(verdicts, 1):
        r = v.run
        rows.append([i, r.config, r.config_hash or "", r.kind, "" if r.rate is None else f"{r.rate:g}",
                     int(v.passed), "; ".join(v.reasons), r.path]
                    + ["" if r.metrics.get(m) is None else repr(r.metrics[m]) for m in metrics])
    return _csv(rows, list(ID_COLUMNS) + metrics)


def _cell(v: Verdict, key: str, fmt: str) -> str:
    value = v.run.metrics.get(key)
    return "-" if value is None else fmt.format(value)


def _best_text(verdicts: list[Verdict], slo: dict) -> str:
    passing = [v for v in verdicts if v.passed]
    if not passing:
        return "No configuration met the SLO." if slo else "No configuration produced results."
    b = passing[0]
    m = b.run.metrics
    return (f"Best: {b.run.name} with {m.get('output_throughput', 0):.1f} output tok/s "
            f"(p95 TTFT {m.get('p95_ttft_ms', float('nan')):.0f} ms, success {m.get('success_pct', 0):.1f} %)"
            + (" within the SLO." if slo else "."))


def _slo_text(slo: dict) -> str:
    return describe(slo) or "none"


def markdown(verdicts: list[Verdict], slo: dict, plots: list[Path], title: str) -> str:
    lines = [f"# {title}", "", f"SLO: {_slo_text(slo)}", "", _best_text(verdicts, slo), "",
             "| rank | configuration | ok | " + " | ".join(h for _, h, _ in TABLE) + " |",
             "|---:|---|---|" + "---:|" * len(TABLE)]
    for i, v in enumerate(verdicts, 1):
        lines.append(f"| {i} | {v.run.name} | {'yes' if v.passed else 'NO'} | "
                     + " | ".join(_cell(v, k, f) for k, _, f in TABLE) + " |")
    failed = [v for v in verdicts if not v.passed]
    if failed:
        lines += ["", "## Why the others failed", ""]
        lines += [f"- **{v.run.name}**: {'; '.join(v.reasons)}" for v in failed]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def html_report(verdicts: list[Verdict], slo: dict, plots: list[Path], title: str) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in ["rank", "configuration", "ok"] + [h for _, h, _ in TABLE])
    rows = []
    for i, v in enumerate(verdicts, 1):
        cls = "" if v.passed else ' class="fail"'
        cells = [str(i), e(v.run.name), "yes" if v.passed else "NO"] + [_cell(v, k, f) for k, _, f in TABLE]
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    failed = "".join(f"<li><b>{e(v.run.name)}</b>: {e('; '.join(v.reasons))}</li>" for v in verdicts if not v.passed)
    imgs = "".join(f'<figure><img src="{e(p.name)}" alt="{e(p.stem)}"><figcaption>{e(p.stem)}</figcaption></figure>'
                   for p in plots)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}tr.fail{color:#a00}"
            "img{max-width:100%}</style></head><body>"
            f"<h1>{e(title)}</h1><p>SLO: {e(_slo_text(slo))}</p><p>{e(_best_text(verdicts, slo))}</p>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table>"
            + (f"<h2>Why the others failed</h2><ul>{failed}</ul>" if failed else "")
            + (f"<h2>Plots</h2>{imgs}" if imgs else "") + "</body></html>\n")


def write_all(verdicts: list[Verdict], slo: dict, plots: list[Path], out: Path, title: str) -> list[Path]:
    files = {"results_long.csv": long_csv(verdicts), "summary.csv": wide_csv(verdicts),
             "report.md": markdown(verdicts, slo, plots, title),
             "report.html": html_report(verdicts, slo, plots, title)}
    for name, text in files.items():
        atomic_write(out / name, text)
    return [out / n for n in files]
