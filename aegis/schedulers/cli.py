"""`aegis submit`, `status` and `cancel`: submit a config's job and follow it from the login node."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from aegis.config.flags import config_options, resolve_from_cli
from aegis.config.sites import Site, choose_site
from aegis.run import Run, default_run_dir, render_job, submit
from aegis.rundir import find_run_dir
from aegis.schedulers.deps import BEGIN_FORMS, StartAfter, parse_begin


@click.command("submit")
@config_options
@click.option("--dry-run", is_flag=True, help="Print the job script instead of submitting it.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default: RUNS_DIR/<time>-<name>).")
@click.option("--json", "as_json", is_flag=True, help="Print the submission as JSON.")
@click.option("--wait", is_flag=True, help="Block until the endpoints are ready (exit 0), the job ends "
              "first (exit 3) or --timeout passes (exit 4).")
@click.option("--timeout", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Seconds --wait waits.")
@click.option("--check", is_flag=True, help="Submit a job that only checks the allocation (one step per "
              "node reports its host, devices and local storage) instead of starting engines.")
@click.option("--after", "after_any", multiple=True, metavar="JOB_ID|RUN_DIR",
              help="Start only after this job has ended, however it ended (afterany; repeatable).")
@click.option("--after-ok", "after_ok", multiple=True, metavar="JOB_ID|RUN_DIR",
              help="Start only after this job has completed with exit status 0 (afterok; repeatable).")
@click.option("--begin", metavar="TIME", help=f"Start no earlier than TIME: {BEGIN_FORMS}.")
def submit_cmd(dry_run, run_dir, as_json, wait, timeout, check, after_any, after_ok, begin, **kw):
    """Render the job script for CONFIG and submit it (sbatch, qsub, or locally)."""
    res = resolve_from_cli(kw)
    start = StartAfter(after_any=tuple(map(_job_id, after_any)), after_ok=tuple(map(_job_id, after_ok)),
                       begin=parse_begin(begin) if begin else None)
    run_path = Path(run_dir).absolute() if run_dir else default_run_dir(res.config)
    if dry_run:
        click.echo(render_job(res, run_path, launch_args=("--check",) if check else (), start=start), nl=False)
        return
    run = submit(res, run_path, check=check, start=start)
    if as_json:
        click.echo(json.dumps({"job_id": run.job_id, "run_dir": str(run.path), "site": res.site.name}))
    else:
        click.echo(f"submitted job {run.job_id} on {res.site.name}; run directory: {run.path}")
    if wait:
        from aegis.schedulers.jobs import wait_for_run

        sys.exit(wait_for_run(run.dir, res.site, timeout, echo=click.echo, until_finished=check))


def _job_id(arg: str) -> str:
    """A job to wait for: a JOB_ID as given, or the job of a submitted RUN_DIR."""
    found = find_run_dir(arg)
    return arg if found is None else Run(found.path).require_job_id()


def _target(arg: str | None, site_opt: str | None) -> tuple[str, Site, Run | None]:
    """RUN_DIR (its own site profile) or a bare JOB_ID (the --site, else the detected one)."""
    found = find_run_dir(arg)
    if found is None:
        return str(arg), choose_site(site_opt), None
    run = Run(found.path, site=choose_site(site_opt) if site_opt else None)
    return run.require_job_id(), run.site, run


@click.command("status")
@click.argument("target", required=False, metavar="[RUN_DIR|JOB_ID]")
@click.option("--site", help="Site of a bare JOB_ID (default: detected).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status_cmd(target, site, as_json):
    """Show the state of a submitted job, its nodes and its instances (default: the newest run).

    Without RUN_DIR or JOB_ID: the newest run under $AEGIS_RUNS_DIR, the site's runs_dir, or ./runs.
    """
    from aegis.schedulers.base import get_scheduler
    from aegis.schedulers.jobs import describe

    job_id, site_obj, run = _target(target, site)
    info = get_scheduler(site_obj.scheduler).status([job_id], {job_id: str(run.path)} if run else None)[job_id]
    if as_json:
        doc = info.to_dict()
        log = run.dir.job_log() if run else None
        endpoints = run.endpoints() if run else None
        doc.update({"site": site_obj.name, "run_dir": str(run.path) if run else None,
                    "log": str(log) if log else None, "endpoints": endpoints.to_json() if endpoints else None})
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo("\n".join(describe(info, run.dir if run else None, site_obj.name)))


@click.command("cancel")
@click.argument("target", required=False, metavar="[RUN_DIR|JOB_ID]")
@click.option("--site", help="Site of a bare JOB_ID (default: detected).")
def cancel_cmd(target, site):
    """Cancel a submitted job (scancel, qdel, or SIGTERM to a local run's process group)."""
    from aegis.schedulers.base import get_scheduler

    job_id, site_obj, run = _target(target, site)
    get_scheduler(site_obj.scheduler).cancel(job_id)
    click.echo(f"cancelled job {job_id}" + (f" ({run.path})" if run else ""))
