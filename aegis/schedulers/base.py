"""The scheduler interface: render a job script, submit it, ask its state, cancel it.

All subprocess calls go through `run_command`, the one seam tests point at a
real Slurm (or a recorded fixture); rendering is pure.
"""
from __future__ import annotations

import enum
import logging
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import jinja2

from aegis._version import __version__
from aegis.config.resolve import job_nodes
from aegis.config.schema import DIRECTIVE_VALUE_RE, Config
from aegis.config.sites import Site
from aegis.errors import ConfigError, SchedulerError, UsageError
from aegis.plan.placement import Plan
from aegis.schedulers.deps import StartAfter
from aegis.templates import environment

log = logging.getLogger("aegis")


class JobState(str, enum.Enum):
    """Normalised job states every backend maps its own onto."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETING = "completing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT)


@dataclass
class JobInfo:
    """What the scheduler says about one job."""

    job_id: str
    state: JobState
    raw_state: str = ""
    reason: str = ""
    nodes: str = ""
    exit_code: str | None = None

    def to_dict(self) -> dict:
        return {"job_id": self.job_id, "state": self.state.value, "raw_state": self.raw_state,
                "reason": self.reason, "nodes": self.nodes, "exit_code": self.exit_code}


@dataclass
class RenderContext:
    """Everything a job script depends on; rendering is a pure function of it."""

    site: Site
    config: Config
    plan: Plan
    run_dir: str  # absolute
    config_path: str  # absolute path of the resolved config inside run_dir
    aegis_command: str | None = None  # default: this Python's `-m aegis`
    launch_args: list = field(default_factory=list)  # extra `aegis launch` flags, e.g. --check
    payload: list | None = None  # run `aegis PAYLOAD...` instead of `aegis launch` (a sweep point)
    start: StartAfter = field(default_factory=StartAfter)  # other jobs to wait for, a time to wait until

    @property
    def nodes(self) -> int:
        return job_nodes(self.config, self.plan)

    @property
    def queue(self):
        """The row of the site's queue table this job goes to (None: no table, or a queue it does not list).

        Chosen when the job script is rendered (submit, --dry-run): a plan may be larger than any queue.
        """
        return self.site.queue_row(self.config.queue, self.nodes, self.config.walltime)

    @property
    def stages(self) -> bool:
        """Whether the job copies weights to node-local storage (site.storage_directives then apply)."""
        return any(spec.model_source for spec in self.config.models)

    @property
    def command(self) -> str:
        if self.aegis_command:
            return self.aegis_command
        if self.site.aegis_command:
            return self.site.aegis_command
        return shlex.join([sys.executable, "-m", "aegis"])

    @property
    def exports(self) -> list[tuple[str, str]]:
        out = [("AEGIS_RUN_DIR", self.run_dir)]
        if self.config.hf_home:
            out.append(("HF_HOME", self.config.hf_home))
        out.extend(sorted(self.config.env.items()))
        return out


def _env() -> jinja2.Environment:
    return environment(q=lambda v: shlex.quote(str(v)))


class Scheduler:
    """Base class: subclasses give the directives, the template and the commands."""

    name = "base"
    template = ""
    directive_prefix = ""
    timeout = 60.0  # seconds a scheduler command may take before it is reported as hanging
    job_id_re = re.compile(r"^$")  # the ids this scheduler gives jobs (a job to wait for must have one)
    job_id_example = ""

    def directives(self, ctx: RenderContext) -> list[str]:
        raise NotImplementedError

    def start_directives(self, start: StartAfter) -> list[str]:
        """The directives that hold the job until `start`'s jobs have ended and its begin time has come."""
        if start:
            raise UsageError(f"the {self.name} scheduler starts a job at once and cannot hold it: --after, "
                             "--after-ok and --begin need a site with Slurm or PBS")
        return []

    def check_job_id(self, job_id: str) -> str:
        """`job_id` if this scheduler could have given it (a job to wait for), else one clear UsageError."""
        if not self.job_id_re.match(job_id):
            raise UsageError(f"--after/--after-ok {job_id!r}: not a {self.name} job id (e.g. {self.job_id_example}); "
                             "give the id `aegis submit` printed, or its run directory")
        return job_id

    def render(self, ctx: RenderContext) -> str:
        if not DIRECTIVE_VALUE_RE.match(ctx.run_dir):
            raise ConfigError(f"run directory {ctx.run_dir!r} contains characters that cannot go into a "
                              "job-script directive (spaces, quotes, '#', '$', ';'); choose another --run-dir")
        return _env().get_template(self.template).render(
            ctx=ctx, site=ctx.site, config=ctx.config, plan=ctx.plan, version=__version__,
            prefix=self.directive_prefix, directives=self.directives(ctx) + self.start_directives(ctx.start))

    # The next three run commands; tests exercise them against a real Slurm.
    def submit(self, script_path: str, run_dir: str) -> str:
        raise NotImplementedError

    def status(self, job_ids: list[str], run_dirs: dict | None = None) -> dict[str, JobInfo]:
        """One call for all `job_ids`; a job the scheduler does not know is UNKNOWN."""
        raise NotImplementedError

    def cancel(self, job_id: str) -> None:
        raise NotImplementedError


def run_command(argv: list[str], timeout: float = 60, cwd: str | None = None,
                what: str | None = None, ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run a scheduler command; a missing binary, a hang or a failure is one clear SchedulerError."""
    what = what or argv[0]
    log.debug("$ %s%s", shlex.join(argv), f"  (in {cwd})" if cwd else "")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except FileNotFoundError:
        raise SchedulerError(f"{argv[0]} not found: is this a login node of the right cluster "
                             "(or is the scheduler's module loaded)?") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{what} did not answer within {timeout:.0f} s; the scheduler may be "
                             "overloaded, try again") from None
    log.debug("exit %d: %s", proc.returncode, " ".join((proc.stdout or proc.stderr or "").split())[:300])
    if proc.returncode not in ok_codes:
        detail = " ".join((proc.stderr or proc.stdout or "").split()) or f"exit status {proc.returncode}"
        raise SchedulerError(f"{what} failed: {detail}")
    return proc


class Poller:
    """Polls several jobs with one scheduler call per round, backing off while nothing changes."""

    def __init__(self, scheduler: Scheduler, first: float = 1.0, factor: float = 1.5, longest: float = 30.0,
                 sleep=time.sleep, run_dirs: dict | None = None):
        self.scheduler = scheduler
        self.first, self.factor, self.longest = first, factor, longest
        self.interval = first
        self.sleep = sleep
        self.last: dict[str, JobState] = {}
        self.run_dirs = run_dirs

    def poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        infos = self.scheduler.status(job_ids, self.run_dirs)
        states = {j: i.state for j, i in infos.items()}
        self.interval = self.first if states != self.last else min(self.longest, self.interval * self.factor)
        self.last = states
        return infos

    def wait(self) -> None:
        self.sleep(self.interval)


def get_scheduler(name: str) -> Scheduler:
    from aegis.schedulers.local import LocalScheduler
    from aegis.schedulers.pbs import PBSScheduler
    from aegis.schedulers.slurm import SlurmScheduler

    return {"slurm": SlurmScheduler, "pbs": PBSScheduler, "local": LocalScheduler}[name]()
