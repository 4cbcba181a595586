"""`aegis report RUN_DIRS...`: ranked tables, CSV and plots from bench, probe, sweep and vLLM results."""
from __future__ import annotations

import click

from aegis.bench.slo import parse_run_slo
from aegis.report.build import DEFAULT_TITLE, make_report


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), default="aegis-report", show_default=True,
              help="Where the CSV, Markdown, HTML and PNG files go.")
@click.option("--slo", default=None, help="SLO as max_METRIC=V,min_METRIC=V (default: the sweep's, if any), "
              "e.g. max_p95_ttft_ms=2000,min_success_pct=99.")
@click.option("--devices", type=click.IntRange(min=1), default=None,
              help="Devices behind each run when no sweep point says (default: one per endpoint).")
@click.option("--title", default=DEFAULT_TITLE, show_default=True)
@click.option("--plots/--no-plots", default=True, show_default=True, help="Draw the PNG plots (needs matplotlib).")
def report_cmd(run_dirs, output_dir, slo, devices, title, plots):
    """Aggregate RUN_DIRS (bench, probe or sweep directories, searched recursively; vllm bench serve result
    files) into a ranked report."""
    report = make_report(run_dirs, output_dir, slo=parse_run_slo(slo) if slo is not None else None,
                         devices=devices, title=title, plots=plots)
    for line in report.lines():
        click.echo(line)
