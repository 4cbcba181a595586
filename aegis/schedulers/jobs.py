"""Following a submitted run from the login node: describe it, wait until its endpoints are ready."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aegis.errors import AegisError
from aegis.launch.endpoints import EndpointsFile
from aegis.rundir import RunDir
from aegis.schedulers.base import JobInfo, JobState, Poller, get_scheduler

# `aegis submit --wait` exit codes.
EXIT_READY, EXIT_JOB_FAILED, EXIT_WAIT_TIMEOUT = 0, 3, 4
SHOW_INSTANCES = 50  # `aegis status` lists this many instances, then counts the rest


def endpoints_ready(doc: EndpointsFile | None) -> bool:
    return doc is not None and doc.all_ready


def describe(info: JobInfo, run: RunDir | None, site_name: str) -> list[str]:
    never_ran = info.state == JobState.CANCELLED and info.exit_code is None  # the reason says why (PBS)
    lines = [f"job {info.job_id} ({site_name}): {info.state.value}"
             + (f" [{info.raw_state}]" if info.raw_state and info.raw_state.lower() != info.state.value else "")
             + (f" on {info.nodes}" if info.nodes else "")
             + (f", exit code {info.exit_code}" if info.exit_code not in (None, "", "0:0", "0") else "")
             + (f" ({info.reason})" if info.reason and (info.state == JobState.PENDING or never_ran) else "")]
    if run is not None:
        lines.append(f"run directory: {run.path}")
        log = run.job_log()
        if log:
            lines.append(f"log: {log}")
        doc = run.read_endpoints()
        if doc and info.state.finished and not doc.state.finished:
            # The job is over but its head never wrote so (killed, its node lost): write the truth.
            run.write_ended(doc, f"the job ended ({info.state.value}) without its head stopping the run")
        if doc:
            for inst in doc.instances[:SHOW_INSTANCES]:
                lines.append(f"  {inst.name:<24} {inst.status.value:<10} {inst.url}")
            if len(doc.instances) > SHOW_INSTANCES:
                counts: dict[str, int] = {}
                for inst in doc.instances:
                    counts[inst.status.value] = counts.get(inst.status.value, 0) + 1
                lines.append(f"  ... {len(doc.instances) - SHOW_INSTANCES} more; all {len(doc.instances)}: "
                             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                             + f" (every one: aegis endpoints {run.path})")
            table = doc.phase_table()
            if table:
                lines.append("startup, seconds from the job's start:")
                lines += ["  " + line for line in table.splitlines()]
    return lines


def _log(msg: str, err: bool = False) -> None:
    logging.getLogger("aegis").info("%s", msg)


def wait_for_run(run: RunDir, site, timeout: float, echo: Callable[..., None] | None = None,
                 poller: Poller | None = None, until_finished: bool = False) -> int:
    """Block until the endpoints are ready (0), the job ends first (3) or `timeout` passes (4).

    With `until_finished` (a --check job, which starts no engines) wait for the job to end:
    completed is 0, any other end 3.
    """
    echo = echo or _log
    job_id = run.job_id
    assert job_id is not None  # callers wait on a run they submitted
    sched = get_scheduler(site.scheduler)
    poller = poller or Poller(sched, run_dirs={job_id: str(run.path)})
    deadline = time.monotonic() + timeout
    last_state = None
    while True:
        doc = run.read_endpoints()
        if doc is not None and endpoints_ready(doc):
            echo(f"job {job_id}: endpoints ready")
            for inst in doc.instances[:SHOW_INSTANCES]:
                echo(f"  {inst.name:<24} {inst.url}")
            if len(doc.instances) > SHOW_INSTANCES:
                echo(f"  ... and {len(doc.instances) - SHOW_INSTANCES} more: {run.endpoints}")
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
            if endpoints_ready(run.read_endpoints()):
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
    doc = run.read_json(run.check)
    return bool(doc and doc.get("ok") is True)


class JobEnded(AegisError):
    """The job finished before its endpoints were ready."""

    exit_code = EXIT_JOB_FAILED


class WaitTimeout(AegisError):
    """`--wait` ran out of time."""

    exit_code = EXIT_WAIT_TIMEOUT
