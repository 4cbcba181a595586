"""The library under the CLI: submit or launch a resolved config, then follow the run through a `Run` handle.

    from aegis.config.resolve import resolve_config
    from aegis.run import Run, submit

    run = submit(resolve_config("examples/local-tiny.yaml"))
    endpoints = run.wait_ready(timeout=1200)   # an EndpointsFile; raises JobEnded / WaitTimeout
    ...
    run.shutdown()                              # or run.cancel()

Every `aegis` command that starts or follows a run goes through this module;
progress is reported through `logging` (logger "aegis").
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from aegis.config.resolve import Resolved, check_paths
from aegis.config.schema import Config
from aegis.config.sites import Site, choose_site, run_site
from aegis.errors import AegisError, ConfigError, UsageError
from aegis.launch.endpoints import EndpointsFile, RunState
from aegis.rundir import RunDir, claim
from aegis.schedulers.deps import StartAfter

log = logging.getLogger("aegis")


def default_run_dir(cfg: Config, now: _dt.datetime | None = None) -> Path:
    """RUNS_DIR/<time>-<name>, with ~ expanded (a fresh directory for each run)."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(os.path.expanduser(cfg.runs_dir)).absolute() / f"{stamp}-{cfg.job_name}"


def render_job(res: Resolved, run_dir: Path, aegis_command: str | None = None,
               launch_args: Sequence[str] = (), payload: list | None = None, start: StartAfter | None = None) -> str:
    """The job script of `res` for its site's scheduler, run from `run_dir` (nothing is written)."""
    from aegis.schedulers.base import RenderContext, get_scheduler

    run = RunDir(run_dir)
    ctx = RenderContext(site=res.site, config=res.config, plan=res.plan, run_dir=str(run.path),
                        config_path=str(run.config), aegis_command=aegis_command,
                        launch_args=["--site-file", str(run.site), *launch_args], payload=payload,
                        start=start or StartAfter())
    return get_scheduler(res.site.scheduler).render(ctx)


def submit(res: Resolved, run_dir: Path | None = None, check: bool = False, start: StartAfter | None = None) -> Run:
    """Check the paths, write the run directory, submit its job script; the Run to follow.

    `start`: jobs to wait for and a time to wait until (aegis.schedulers.deps.StartAfter).
    """
    check_paths(res.config)
    if res.site.account_required and not res.config.account:
        raise ConfigError(f"site {res.site.name} needs a project to charge: set account: in the config "
                          "or pass --account NAME")
    launch_args = ("--check",) if check else ()
    path = Path(run_dir).absolute() if run_dir else default_run_dir(res.config)
    # A bad config (or --after/--begin value) fails before any directory exists.
    script = render_job(res, path, launch_args=launch_args, start=start)
    if not run_dir:
        claimed = claim(path)  # this name, or -2, -3, ... when another run took it this second
        if claimed != path:
            path, script = claimed, render_job(res, claimed, launch_args=launch_args, start=start)
    run = RunDir(path)
    job_id = run.write_submission(res, script)
    log.info("submitted job %s on %s; run directory: %s", job_id, res.site.name, run.path)
    return Run(run.path, site=res.site)


class Run:
    """A handle on one run directory: its job, its endpoints, and the verbs that end it."""

    def __init__(self, path: os.PathLike | str, site: Site | None = None):
        self.dir = RunDir(Path(path))
        self._site = site

    def __repr__(self) -> str:
        return f"Run({str(self.dir.path)!r})"

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def job_id(self) -> str | None:
        return self.dir.job_id

    @property
    def site(self) -> Site:
        """The run's own saved site profile (the one it was submitted with)."""
        if self._site is None:
            name = self.dir.site_name()
            self._site = run_site(self.path, name) if name and self.dir.site.exists() else choose_site(name)
        return self._site

    def endpoints(self) -> EndpointsFile | None:
        return self.dir.read_endpoints()

    def job(self):
        """The scheduler's view of the job (a JobInfo with a normalised JobState)."""
        from aegis.schedulers.base import get_scheduler

        job_id = self.require_job_id()
        return get_scheduler(self.site.scheduler).status([job_id], {job_id: str(self.path)})[job_id]

    def wait_ready(self, timeout: float = 3600.0, echo: Callable[..., None] | None = None,
                   until_finished: bool = False) -> EndpointsFile | None:
        """Block until every instance is ready (the EndpointsFile); JobEnded or WaitTimeout otherwise.

        With `until_finished` (a --check job) wait for the job to end instead; returns None.
        """
        from aegis.schedulers.jobs import wait_for_run

        wait_for_run(self.dir, self.site, timeout, echo=echo, until_finished=until_finished)
        return None if until_finished else self.endpoints()

    def cancel(self) -> None:
        from aegis.schedulers.base import get_scheduler

        get_scheduler(self.site.scheduler).cancel(self.require_job_id())
        log.info("cancelled job %s (%s)", self.job_id, self.path)

    def shutdown(self, timeout: float = 120.0) -> None:
        """Ask the head to stop every instance; wait until they are stopped (unless timeout is 0)."""
        self.dir.request_shutdown()
        if timeout <= 0:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.endpoints()  # repaired to failed when the head is provably gone
            if doc is not None and doc.state in (RunState.STOPPED, RunState.FAILED) and not self.head_alive():
                return
            time.sleep(0.5)
        raise AegisError(f"{self.path}: instances still running after {timeout:.0f} s; "
                         f"see {self.dir.logs} and try again, or cancel the job")

    def head_alive(self) -> bool:
        """Whether the head recorded in launch.json still runs (only checkable from its own host)."""
        return self.dir.head_status() == "alive"

    def require_job_id(self) -> str:
        """The job id, or a UsageError when the run was never submitted (or its submission was refused)."""
        job_id = self.job_id
        if not job_id:
            raise UsageError(f"{self.path} has no job id (was the submission refused?)")
        return job_id
