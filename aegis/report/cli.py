"""`aegis report RUN_DIRS...`: ranked tables, CSV and plots from bench, probe and sweep result directories."""
from __future__ import annotations

import json
from pathlib import Path

import click

from aegis.report.analyze import parse_slo, rank
from aegis.report.collect import collect


def _sweep_slo(paths) -> dict:
    """The SLO of the first sweep.json found at or above the given directories."""
    for given in paths:
        for d in [Path(given).absolute(), *Path(given).absolute().parents]:
            f = d / "sweep.json"
            if f.is_file():
                try:
                    return dict(json.loads(f.read_text()).get("slo") or {})
                except ValueError:
                    return {}
    return {}


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), default="aegis-report", show_default=True,
              help="Where the CSV, Markdown, HTML and PNG files go.")
@click.option("--slo", default=None, help="SLO as max_METRIC=V,min_METRIC=V (default: the sweep's, if any), "
              "e.g. max_p95_ttft_ms=2000,min_success_pct=99.")
@click.option("--devices", type=click.IntRange(min=1), default=None,
              help="Devices behind each run when no sweep point says (default: one per endpoint).")
@click.option("--title", default="aegis report", show_default=True)
@click.option("--plots/--no-plots", default=True, show_default=True, help="Draw the PNG plots (needs matplotlib).")
def report_cmd(run_dirs, output_dir, slo, devices, title, plots):
    """Aggregate RUN_DIRS (bench, probe or sweep directories, searched recursively) into a ranked report."""
    slo_map = parse_slo(slo) if slo is not None else _sweep_slo(run_dirs)
    verdicts = rank(collect(run_dirs, devices), slo_map)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    if plots:
        from aegis.report.plots import all_plots
        pngs = all_plots(verdicts, out)
    from aegis.report.render import write_all
    files = write_all(verdicts, slo_map, pngs, out, title)
    passing = sum(v.passed for v in verdicts)
    click.echo(f"{len(verdicts)} runs, {passing} meet the SLO; best: "
               f"{next((v.run.name for v in verdicts if v.passed), 'none')}")
    for f in files + pngs:
        click.echo(f"  {f}")
