"""`aegis sweep SPEC --dry-run`: list the configurations, their hashes and what runs; optionally render jobs."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from aegis.bench.slo import describe
from aegis.errors import AegisError, UsageError
from aegis.sweep.expand import SWEEP_FILE, Point, expand, render_points, run_steps, spec_hash, sweep_document
from aegis.sweep.spec import SweepSpec, load_spec
from aegis.sweep.status import FINISHED, PointState
from aegis.util.tables import format_table


def _settings_text(point: Point) -> str:
    if not point.settings:
        return "(base)"
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.settings.items())


def format_dry_run(spec: SweepSpec, points: list[Point]) -> str:
    """The human listing: one line per configuration, then the steps every configuration runs."""
    site = points[0].site
    n_axes = sum(1 for p in points if p.origin == "axes")
    lines = [f"sweep {spec.name} ({spec.path}): {len(points)} configurations "
             f"({n_axes} from axes, {len(points) - n_axes} included) on site {site.name} "
             f"({site.scheduler}); spec hash {spec_hash(spec)}"]
    rows = []
    for i, p in enumerate(points, 1):
        m = p.config.models[0]
        dev = f"{m.instances}x{m.devices_per_instance}={p.devices}"
        rows.append((i, p.hash, p.label, dev, p.plan.nodes_required, _settings_text(p)))
    lines.append(format_table(("#", "HASH", "NAME", "DEVICES", "NODES", "SETTINGS"), rows))
    lines.append("each configuration: start the servers and wait until healthy, then")
    for step in run_steps(spec):
        args = " ".join(shlex.quote(a) for a in step["args"])
        lines.append(f"  {step['step']}: aegis {args} --endpoints RUN_DIR --output-dir RUN_DIR/{step['subdir']}")
    if spec.slo:
        lines.append("SLO: " + describe(spec.slo))
    return "\n".join(lines)


def default_mode(site) -> str:
    """inline on the local site or inside an allocation of the site's scheduler; else one job per point."""
    if site.scheduler == "local":
        return "inline"
    from aegis.launch.allocation import discover

    return "inline" if discover(prefer=site.scheduler).scheduler == site.scheduler else "jobs"


@click.command("sweep")
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="List the configurations and what runs; start nothing.")
@click.option("--render", "render_dir", type=click.Path(file_okay=False),
              help="With --dry-run: write each configuration's run directory and job script under DIR.")
@click.option("--site", help="Site profile (default: the spec's, else the base config's, else detected).")
@click.option("--site-file", multiple=True, type=click.Path(dir_okay=False), help="Extra site profile file(s).")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the expanded sweep as JSON.")
@click.option("--mode", type=click.Choice(["inline", "jobs"]), default=None,
              help="inline: one point after another here (local site, or inside an allocation); jobs: one "
              "job per point. Default: inline on the local site or inside an allocation, else jobs.")
@click.option("--dir", "sweep_dir", type=click.Path(file_okay=False),
              help="Sweep directory (default: runs/sweep-<name>).")
@click.option("--resume", is_flag=True, help="Continue the sweep in its directory: finished points are skipped, "
              "jobs still queued are waited for, interrupted points run again.")
@click.option("--rerun", multiple=True, metavar="LABEL|HASH",
              help="Run this finished configuration again (repeatable; 'all' for every one). Its earlier "
              "results move to <point>/attempts/N.")
@click.option("--retry-failed", is_flag=True, help="Run the configurations that failed earlier again.")
@click.option("--submit", is_flag=True, help="--mode inline from a login node: submit ONE job, as large as the "
              "biggest configuration, that runs the configurations one after another.")
@click.option("--walltime", default=None, help="With --submit: the job's walltime (default: the base config's "
              "walltime x the configurations to run).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="--mode jobs: wait until every job has ended (else submit and return).")
@click.option("--cancel", is_flag=True, help="Cancel every queued or running job of the sweep.")
@click.option("--report/--no-report", "make_report", default=True, show_default=True,
              help="Write the report (DIR/report) when every point has finished.")
def sweep_cmd(spec_path, dry_run, render_dir, site, site_file, as_json, mode, sweep_dir, resume, rerun,
              retry_failed, submit, walltime, wait, cancel, make_report):
    """Run a server-configuration sweep: SPEC.yaml's base config x axes (+ named configurations).

    Exit status: 0 every configuration measured, 3 some failed (their reasons are in the summary and
    the report), 130 interrupted (continue with --resume).
    """
    if render_dir and not dry_run:
        raise UsageError("--render goes with --dry-run (a real run writes its own directories)")
    spec = load_spec(spec_path)
    points = expand(spec, site, site_file)
    if dry_run:
        if render_dir:
            written = render_points(spec, points, Path(render_dir))
        if as_json:
            click.echo(json.dumps(sweep_document(spec, points), indent=2))
        else:
            click.echo(format_dry_run(spec, points))
            if render_dir:
                click.echo(f"wrote {len(written)} job scripts under {Path(render_dir).absolute()}")
        return
    from aegis.sweep import execute

    echo = lambda msg: click.echo(msg, err=True)  # noqa: E731
    target = Path(sweep_dir) if sweep_dir else execute.default_dir(spec)
    if cancel:
        if not (target / SWEEP_FILE).exists():
            raise UsageError(f"{target.absolute()} holds no sweep (no sweep.json); give its --dir")
        n = execute.cancel_jobs(points, target.absolute(), echo)
        click.echo(f"cancelled {n} job(s)")
        return
    if (submit or walltime) and mode != "inline":
        raise UsageError("--submit and --walltime go with --mode inline (one job running every configuration)")
    if submit and points[0].site.scheduler == "local":
        raise UsageError("--submit needs a site with a scheduler; on the local site run without it")
    mode = mode or default_mode(points[0].site)
    target = execute.prepare(spec, points, target, resume or bool(rerun) or retry_failed)
    echo(f"sweep {spec.name}: {len(points)} configurations, mode {mode}, directory {target}")
    if submit:
        execute.submit_inline(spec, points, target, execute.select(points, target, rerun, retry_failed, echo),
                              walltime, echo)
        return
    if mode == "inline":
        execute.run_inline(spec, execute.select(points, target, rerun, retry_failed, echo), target, echo)
    else:
        execute.run_jobs(spec, points, target, rerun, retry_failed, wait, echo)
    states = [(execute.read_status(target / p.dirname) or {}).get("state") for p in points]
    click.echo("\n".join(execute.summary_lines(points, target)))
    if all(s in FINISHED for s in states):
        if make_report:
            _report(target, echo)
        if PointState.FAILED in states:
            raise SomeFailed(f"{states.count('failed')} of {len(points)} configuration(s) failed; "
                             f"see {target}/*/status.json (--retry-failed runs them again)")


class SomeFailed(AegisError):
    exit_code = 3


def _report(target: Path, echo) -> None:
    from aegis.report.build import make_report

    try:
        import matplotlib  # noqa: F401
        plots = True
    except ImportError:
        plots = False
        echo("matplotlib is not installed: the report has no plots (pip install 'aegis[plots]')")
    report = make_report([target], target / "report", plots=plots)  # the SLO: the sweep's (sweep.json)
    click.echo("\n".join(report.lines()))


@click.command("sweep-point", hidden=True)
@click.argument("point_dir", type=click.Path(file_okay=False, exists=True))
def sweep_point_cmd(point_dir):
    """Run one sweep point in this allocation (what a point's job script runs)."""
    from aegis.sweep.runner import Interrupted, PointRunner

    status = PointRunner(Path(point_dir), lambda msg: click.echo(msg, err=True)).run()
    if status["state"] == PointState.INTERRUPTED:
        raise Interrupted(f"interrupted: {status.get('reason')}")
    if status["state"] == PointState.FAILED:
        raise SomeFailed(f"configuration failed: {status.get('reason')}")
