"""The run directory: the one owner of its file names, the protocol between login node, head, agents and tools.

Every process of a run (the login node's `submit`, the head of `aegis launch`,
the per-node agents, sweeps, bench, status and shutdown) finds the others'
files through a RunDir; no other module spells a file name of the run
directory. Layout:

    config.yaml      the resolved config                      (written at submission / launch)
    site.yaml        the site profile as resolved              (idem)
    plan.json        the Plan (aegis.plan.placement)           (idem)
    job.sh           the job script                            (submission)
    job_id           the scheduler's job id                    (submission)
    allocation.json  hosts and serving addresses of the job    (head)
    launch.json      the head's pid, start time and host       (head)
    api_key          the per-run key, mode 0600                (head)
    staged.json      where each model was staged on the nodes  (head)
    endpoints.json   the EndpointsFile (aegis.launch.endpoints) (head)
    nodes/N.status.json  the NodeStatus of node N (aegis.launch.node_status) (agent)
    nodes/N.json     an allocation-check report of node N      (agent --check)
    check.json       the allocation check's verdict            (head --check)
    shutdown         present: stop the run                     (aegis shutdown)
    drain.json       instances that take no new requests       (aegis drain)
    gateways/<host>-<pid>.json  a gateway following the run: its URL, in-flight counts (aegis gateway)
    gateway.json     the run's own gateway: its URL, pid, host  (gateway: true; that gateway)
    logs/            one log per engine rank, agents.log, step logs
    engine/          per-instance engine config files, mode 0600
    point.json, status.json, bench/   a sweep point's description, state and results
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aegis.errors import UsageError
from aegis.util.fs import atomic_write


def claim(path: Path) -> Path:
    """Create a new run directory at `path`, or at `path`-2, -3, ... when that one exists (two runs
    started in the same second with the same name); mkdir is atomic, so each run gets its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir(mode=0o700)
            return candidate
        except FileExistsError:
            continue
    raise UsageError(f"cannot create a new run directory next to {path}; clean up {path.parent}")

if TYPE_CHECKING:  # imported lazily at run time: reading a run must not import the planner
    from aegis.config.resolve import Resolved
    from aegis.launch.endpoints import EndpointsFile
    from aegis.plan.placement import Plan
    from aegis.schedulers.base import Scheduler

SUBMITTED_MARKER = "job_id"  # a directory holding it was submitted to a scheduler
LAUNCHED_MARKER = "launch.json"  # a directory holding it was started by `aegis launch`


@dataclass(frozen=True)
class RunDir:
    """One run's directory and every file in it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(os.path.expanduser(str(self.path))).absolute())

    # -- files -----------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def site(self) -> Path:
        return self.path / "site.yaml"

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def script(self) -> Path:
        return self.path / "job.sh"

    @property
    def job_id_file(self) -> Path:
        return self.path / SUBMITTED_MARKER

    @property
    def allocation(self) -> Path:
        return self.path / "allocation.json"

    @property
    def head(self) -> Path:
        return self.path / LAUNCHED_MARKER

    @property
    def api_key(self) -> Path:
        return self.path / "api_key"

    @property
    def staged(self) -> Path:
        return self.path / "staged.json"

    @property
    def endpoints(self) -> Path:
        return self.path / "endpoints.json"

    @property
    def check(self) -> Path:
        return self.path / "check.json"

    @property
    def shutdown(self) -> Path:
        return self.path / "shutdown"

    @property
    def drain(self) -> Path:
        return self.path / "drain.json"

    @property
    def gateways(self) -> Path:
        return self.path / "gateways"

    def gateway_status(self, host: str, pid: int) -> Path:
        return self.gateways / f"{host}-{pid}.json"

    @property
    def gateway(self) -> Path:
        return self.path / "gateway.json"

    @property
    def nodes(self) -> Path:
        return self.path / "nodes"

    def node_status(self, index: int) -> Path:
        return self.nodes / f"{index}.status.json"

    def node_statuses(self) -> list[Path]:
        return sorted(self.nodes.glob("*.status.json"))

    def node_check(self, index: int) -> Path:
        return self.nodes / f"{index}.json"

    def node_checks(self) -> list[Path]:
        return [p for p in sorted(self.nodes.glob("*.json")) if not p.name.endswith(".status.json")]

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def log(self, name: str) -> Path:
        """The log of an engine rank (`<instance>` or `<instance>.rank<r>`) or of a step (`agents`, `bench`)."""
        return self.logs / f"{name}.log"

    @property
    def launch_log(self) -> Path:
        return self.path / "launch.log"

    @property
    def engine_dir(self) -> Path:
        return self.path / "engine"

    @property
    def point(self) -> Path:
        return self.path / "point.json"

    @property
    def point_status(self) -> Path:
        return self.path / "status.json"

    @property
    def bench(self) -> Path:
        return self.path / "bench"

    # -- reading -----------------------------------------------------------------------------

    @property
    def job_id(self) -> str | None:
        try:
            return self.job_id_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def site_name(self) -> str | None:
        from aegis.config.schema import load_yaml

        if not self.config.exists():
            return None
        site = load_yaml(self.config).get("site")
        return site if isinstance(site, str) else None

    def read_endpoints(self) -> EndpointsFile | None:
        """The endpoints file, or None while there is none or it cannot be read (it is replaced atomically).

        A file that still says starting/ready/degraded while its head is provably gone (killed on
        this host) is repaired first: the run and its live instances become failed, with the reason.
        """
        from aegis.launch.endpoints import EndpointsFile

        doc = EndpointsFile.read_optional(self.endpoints)
        if doc is not None and not doc.state.finished and self.head_status() == "gone":
            info = self.read_json(self.head) or {}
            self.write_ended(doc, f"the run's head (pid {info.get('pid')} on {info.get('host')}) ended without "
                                  "stopping the run")
        return doc

    def write_ended(self, doc: EndpointsFile, reason: str) -> None:
        """Mark a run that ended without its head saying so (EndpointsFile.mark_ended) and write it back."""
        doc.mark_ended(reason)
        try:
            doc.write(self.endpoints)
        except OSError:
            pass  # a reader that cannot write still reports the truth

    def head_status(self) -> str:
        """'alive' or 'gone' for a head recorded on this host (pid and start time), else 'unknown'."""
        info = self.read_json(self.head)
        if not info or info.get("host") != socket.gethostname():
            return "unknown"
        import psutil

        try:
            proc = psutil.Process(info["pid"])
            alive = proc.create_time() == info["create_time"] and proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, KeyError, TypeError):
            alive = False
        return "alive" if alive else "gone"

    def read_plan(self) -> Plan:
        from aegis.plan.placement import Plan

        return Plan.read(self.plan)

    def read_api_key(self) -> str | None:
        try:
            return self.api_key.read_text().strip() or None
        except FileNotFoundError:
            return None

    def read_json(self, path: Path) -> dict | None:
        """A small JSON record of this run, or None when missing or unreadable."""
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def job_log(self) -> Path | None:
        """The scheduler's output file of the job (Slurm slurm-<id>.out, PBS pbs.out, local job.out)."""
        job_id = (self.job_id or "").split(".")[0]
        for name in (f"slurm-{job_id}.out", "pbs.out", "job.out", f"job.sh.o{job_id}"):
            if (self.path / name).exists():
                return self.path / name
        return None

    # -- writing -----------------------------------------------------------------------------

    def write_inputs(self, res: Resolved) -> None:
        """config.yaml, site.yaml and plan.json: what the head and agents of the run read."""
        from aegis.config.schema import dump_yaml
        from aegis.config.sites import save_site

        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config, dump_yaml(res.config))
        if res.site.source != str(self.site):  # not already this run's own saved profile
            save_site(res.site, self.site)
        atomic_write(self.plan, res.plan.to_json())

    def write_script(self, script: str) -> Path:
        atomic_write(self.script, script, mode=0o755)
        return self.script

    def write_submission(self, res: Resolved, script: str) -> str:
        """Write config, site, plan and job script, submit the script, record the job id; returns it.

        The directory must be new or empty: a run directory holds one run.
        """
        if self.path.exists() and any(self.path.iterdir()):
            raise UsageError(f"run directory {self.path} already exists and is not empty; choose another --run-dir")
        self.write_inputs(res)
        return self.submit(self.write_script(script), res.site.scheduler)

    def submit(self, script: Path, scheduler: str | Scheduler) -> str:
        """Submit `script` from this directory (scheduler: a name or a Scheduler) and record the job id."""
        from aegis.schedulers.base import get_scheduler

        sched = get_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
        job_id = sched.submit(str(script), str(self.path))
        atomic_write(self.job_id_file, job_id + "\n")
        return job_id

    def request_shutdown(self) -> None:
        atomic_write(self.shutdown, f"{time.time()}\n")


def find_run_dir(arg: str | None, runs_dir: str | None = None, marker: str = SUBMITTED_MARKER) -> RunDir | None:
    """RUN_DIR as given; no argument: the newest run directory under `runs_dir`; a job id: None.

    `marker` is the file that makes a directory a run directory for the caller: `job_id` for
    submitted runs, `launch.json` for anything `aegis launch` started (also by hand).
    """
    if arg is None:
        root = Path(os.path.expanduser(runs_dir or default_runs_dir()))
        candidates = [p for p in root.glob("*") if (p / marker).exists()] if root.is_dir() else []
        if not candidates:
            raise UsageError(f"no run directory given and none under {root}/: pass RUN_DIR or JOB_ID")
        return RunDir(max(candidates, key=lambda p: (p / marker).stat().st_mtime))
    path = Path(os.path.expanduser(arg))
    if path.is_dir():
        if not (path / marker).exists():
            what = "a submitted run directory" if marker == SUBMITTED_MARKER else "a launched run directory"
            raise UsageError(f"{path} is not {what} (it has no {marker} file)")
        return RunDir(path)
    if os.sep in arg:
        raise UsageError(f"{arg}: no such run directory")
    return None


def default_runs_dir() -> str:
    """Where status/cancel/shutdown look without RUN_DIR: $AEGIS_RUNS_DIR, else the detected site's
    default `runs_dir`, else ./runs (the config's default)."""
    if os.environ.get("AEGIS_RUNS_DIR"):
        return os.environ["AEGIS_RUNS_DIR"]
    from aegis.config.sites import choose_site

    try:
        runs_dir = choose_site(None).defaults.get("runs_dir")
    except UsageError:
        runs_dir = None
    return runs_dir if isinstance(runs_dir, str) else "runs"
