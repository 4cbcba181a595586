"""Job commands on the login node: status, cancel, and waiting for a submitted run."""
from __future__ import annotations

import json
import time
from typing import Optional

import click

from aegis.errors import AegisError, UsageError
from aegis.rundir import RunDir, find_run_dir
from aegis.schedulers.base import JobInfo, JobState, Poller, get_scheduler
from aegis.sites import choose_site, run_site

# `aegis submit --wait` exit codes.
EXIT_READY, EXIT_JOB_FAILED, EXIT_WAIT_TIMEOUT = 0, 3, 4


def _target(arg: Optional[str], site_opt: Optional[str], site_files=()) -> tuple[str, object, Optional[RunDir]]:
    run = find_run_dir(arg)
    if run is not None:
        job_id = run.job_id
        if not job_id:
            raise UsageError(f"{run.path} has no job id (was the submission refused?)")
        name = site_opt or run.site_name()
        saved = run.path / "site.yaml"
        site = run_site(run.path, name) if name and not site_opt and not site_files and saved.exists() \
            else choose_site(name, site_files)
    else:
        job_id = arg
        site = choose_site(site_opt, site_files)
    return job_id, site, run


def endpoints_ready(doc: Optional[dict]) -> bool:
    if not doc or not doc.get("instances"):
        return False
    return doc.get("state") == "ready" or all(i.get("status") == "ready" for i in doc["instances"])


def describe(info: JobInfo, run: Optional[RunDir], site_name: str) -> list[str]:
    lines = [f"job {info.job_id} ({site_name}): {info.state.value}"
             + (f" [{info.raw_state}]" if info.raw_state and info.raw_state.lower() != info.state.value else "")
             + (f" on {info.nodes}" if info.nodes else "")
             + (f", exit code {info.exit_code}" if info.exit_code not in (None, "", "0:0", "0") else "")
             + (f" ({info.reason})" if info.reason and info.state == JobState.PENDING else "")]
    if run is not None:
        lines.append(f"run directory: {run.path}")
        log = run.job_log()
        if log:
            lines.append(f"log: {log}")
        doc = run.endpoints()
        if doc:
            for inst in doc.get("instances", []):
                lines.append(f"  {inst.get('name', '?'):<24} {inst.get('status', '?'):<10} {inst.get('url', '')}")
    return lines


@click.command("status")
@click.argument("target", required=False, metavar="[RUN_DIR|JOB_ID]")
@click.option("--site", help="Site of a bare JOB_ID (default: detected).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status_cmd(target, site, as_json):
    """Show the state of a submitted job, its nodes and its instances (default: the newest run in ./runs)."""
    job_id, site_obj, run = _target(target, site)
    sched = get_scheduler(site_obj.scheduler)
    info = sched.status([job_id], {job_id: str(run.path)} if run else None)[job_id]
    if as_json:
        doc = info.to_dict()
        doc.update({"site": site_obj.name, "run_dir": str(run.path) if run else None,
                    "log": str(run.job_log()) if run and run.job_log() else None,
                    "endpoints": run.endpoints() if run else None})
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo("\n".join(describe(info, run, site_obj.name)))


@click.command("cancel")
@click.argument("target", required=False, metavar="[RUN_DIR|JOB_ID]")
@click.option("--site", help="Site of a bare JOB_ID (default: detected).")
def cancel_cmd(target, site):
    """Cancel a submitted job (scancel, qdel, or SIGTERM to a local run's process group)."""
    job_id, site_obj, run = _target(target, site)
    get_scheduler(site_obj.scheduler).cancel(job_id)
    click.echo(f"cancelled job {job_id}" + (f" ({run.path})" if run else ""))


def wait_for_run(run: RunDir, site, timeout: float, echo=click.echo, poller: Optional[Poller] = None,
                 until_finished: bool = False) -> int:
    """Block until the endpoints are ready (0), the job ends first (3) or `timeout` passes (4).

    With `until_finished` (a --check job, which starts no engines) wait for the job to end:
    completed is 0, any other end 3.
    """
    job_id = run.job_id
    sched = get_scheduler(site.scheduler)
    poller = poller or Poller(sched, run_dirs={job_id: str(run.path)})
    deadline = time.monotonic() + timeout
    last_state = None
    while True:
        doc = run.endpoints()
        if endpoints_ready(doc):
            echo(f"job {job_id}: endpoints ready")
            for inst in doc["instances"]:
                echo(f"  {inst.get('name', '?'):<24} {inst.get('url', '')}")
            return EXIT_READY
        info = poller.poll([job_id])[job_id]
        if info.state != last_state:
            echo(f"job {job_id}: {info.state.value}" + (f" on {info.nodes}" if info.nodes else ""), err=True)
            last_state = info.state
        if until_finished and (info.state.finished or info.state == JobState.UNKNOWN) and _check_ok(run):
            # The check job's own record decides: some schedulers (PBS wrappers) do not say how a job ended.
            echo(f"job {job_id}: allocation check passed")
            return EXIT_READY
        if info.state.finished:
            if endpoints_ready(run.endpoints()):
                continue
            log = run.job_log()
            raise JobEnded(f"job {job_id} ended ({info.state.value}"
                           + (f", exit code {info.exit_code}" if info.exit_code else "")
                           + (")" if until_finished else ") before its endpoints were ready")
                           + (f"; log: {log}" if log else f"; run directory: {run.path}"))
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for job {job_id} "
                              f"(still {info.state.value}); `aegis status {run.path}` or "
                              f"`aegis cancel {run.path}`")
        poller.sleep(min(poller.interval, max(0.1, deadline - time.monotonic())))


def _check_ok(run: RunDir) -> bool:
    try:
        return json.loads((run.path / "check.json").read_text()).get("ok") is True
    except (OSError, ValueError):
        return False


class JobEnded(AegisError):
    """The job finished before its endpoints were ready."""

    exit_code = EXIT_JOB_FAILED


class WaitTimeout(AegisError):
    """`--wait` ran out of time."""

    exit_code = EXIT_WAIT_TIMEOUT
