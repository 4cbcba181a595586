"""PBS Pro: #PBS directives, qsub, qstat -f -F json (then plain qstat -f), qdel."""
from __future__ import annotations

import json
import re

from aegis.config.schema import walltime_seconds
from aegis.errors import SchedulerError
from aegis.schedulers.base import JobInfo, JobState, RenderContext, Scheduler, run_command
from aegis.schedulers.deps import StartAfter

# PBS job_state letters -> JobState ('F' and 'X' are refined by Exit_status).
STATES = {
    "Q": JobState.PENDING, "H": JobState.PENDING, "W": JobState.PENDING, "T": JobState.PENDING,
    "S": JobState.PENDING, "U": JobState.PENDING, "M": JobState.PENDING,
    "R": JobState.RUNNING, "B": JobState.RUNNING, "E": JobState.COMPLETING,
    "F": JobState.COMPLETED, "X": JobState.COMPLETED, "C": JobState.COMPLETED,
}
EXIT_WALLTIME = -29  # PBS Pro JOB_EXEC_KILL_WALLTIME
SIGNAL_BASE = 256  # Exit_status 256+N: killed by signal N (qdel sends SIGTERM: 271)
SUBSTATE_TERMINATED = "91"  # PBS Pro JOB_SUBSTATE_TERMINATED: finished because it was deleted
SUBSTATE_DEPNHOLD = "22"  # JOB_SUBSTATE_DEPNHOLD: held (H, Hold_Types s) until its `depend` jobs have ended
SUBSTATE_WAITING = "30"  # JOB_SUBSTATE_WAITING: waiting (W) for its Execution_Time (qsub -a)
UNKNOWN_JOB = 153  # qstat/qdel exit status for an id the server does not know (PBSE_UNKJOBID - 15000)
JOB_FINISHED = 35  # qdel exit status for a job that has already finished


def pbs_time(walltime: str) -> str:
    """Seconds -> PBS's HH:MM:SS (hours may exceed 24)."""
    secs = walltime_seconds(walltime)
    return f"{secs // 3600:02d}:{secs % 3600 // 60:02d}:{secs % 60:02d}"


def _finished_state(attrs: dict) -> JobState:
    """How a finished job (F/X) ended, as the real server records it (tests/pbs/recorded/): the walltime first
    (Exit_status -29, "exceeded resource walltime"), then a deletion (substate 91, "... and terminated by
    USER" whatever the exit status: 271, 143, or 0 for a root job; no Exit_status when it never ran), then
    the exit status."""
    raw_code = attrs.get("Exit_status", attrs.get("exit_status"))
    comment = str(attrs.get("comment", "")).lower()
    substate = str(attrs.get("substate", ""))
    if str(raw_code) == str(EXIT_WALLTIME) or "walltime" in comment:
        return JobState.TIMEOUT
    if substate == SUBSTATE_TERMINATED or "terminated" in comment or "deleted" in comment:
        return JobState.CANCELLED
    if raw_code is None:
        if attrs.get("depend"):
            return JobState.CANCELLED  # never ran: the server deleted it, its dependency cannot be met
        # Torque-style 'C' without an exit status (e.g. Slurm's qstat wrapper): it ended, outcome unknown.
        return JobState.COMPLETED if attrs.get("job_state") in ("F", "X") else JobState.UNKNOWN
    try:
        code = int(raw_code)
    except (TypeError, ValueError):
        return JobState.UNKNOWN
    if code == 0:
        return JobState.COMPLETED
    if code == SIGNAL_BASE + 15:
        return JobState.CANCELLED
    return JobState.FAILED


def _reason(attrs: dict, state: JobState) -> str:
    """The server's comment; for what it leaves uncommented (tests/pbs/recorded/README.md), the words Slurm
    uses: 'Dependency (depend)' while held for other jobs, 'BeginTime (Execution_Time)' while waiting for
    qsub -a's time, and why a job that never ran was deleted."""
    comment = str(attrs.get("comment", ""))
    substate, depend = str(attrs.get("substate", "")), attrs.get("depend")
    if comment:
        return comment
    if attrs.get("job_state") == "H" and substate == SUBSTATE_DEPNHOLD:
        return f"Dependency ({depend})" if depend else "Dependency"
    if attrs.get("job_state") == "W" and substate == SUBSTATE_WAITING:
        return f"BeginTime ({attrs['Execution_Time']})" if attrs.get("Execution_Time") else "BeginTime"
    if state == JobState.CANCELLED and depend and attrs.get("Exit_status", attrs.get("exit_status")) is None:
        return f"deleted by the server: its dependency cannot be met ({depend})"
    return ""


def _info(job_id: str, attrs: dict) -> JobInfo:
    raw = str(attrs.get("job_state", "?"))
    state = STATES.get(raw, JobState.UNKNOWN)
    if raw in ("F", "X", "C"):
        state = _finished_state(attrs)
    hosts = sorted({part.split("/")[0] for part in str(attrs.get("exec_host", "")).split("+") if part})
    exit_code = attrs.get("Exit_status", attrs.get("exit_status"))
    if raw == "C" and exit_code is None:
        raw = "C (ended; this qstat does not say how)"
    return JobInfo(job_id=job_id, state=state, raw_state=raw, reason=_reason(attrs, state),
                   nodes=",".join(hosts), exit_code=None if exit_code is None else str(exit_code))


def parse_qstat_json(text: str) -> dict[str, JobInfo]:
    """`qstat -f -F json -x IDS` (PBS Pro 19+): {"Jobs": {id: {attributes}}}; no "Jobs" when none."""
    data = json.loads(text)
    return {jid: _info(jid, attrs) for jid, attrs in (data.get("Jobs") or {}).items()}


def parse_qstat_full(text: str) -> dict[str, JobInfo]:
    """Plain `qstat -f`: 'Job Id: ID' blocks of 'key = value' lines (long values wrap with a tab)."""
    jobs: dict[str, dict] = {}
    current = None
    key = None
    for line in text.splitlines():
        m = re.match(r"^Job Id:\s*(\S+)", line)
        if m:
            current = jobs.setdefault(m.group(1), {})
            key = None
            continue
        if current is None:
            continue
        m = re.match(r"^\s+([A-Za-z_.]+) = (.*)$", line)
        if m:
            key = m.group(1)
            current[key] = m.group(2)
        elif line.startswith("\t") and key:
            current[key] += line[1:]  # a long value wraps anywhere, even inside a word: only the tab goes
    return {jid: _info(jid, attrs) for jid, attrs in jobs.items()}


def _same_job(a: str, b: str) -> bool:
    return a == b or a.split(".")[0] == b.split(".")[0]


class PBSScheduler(Scheduler):
    name = "pbs"
    template = "pbs.sh.j2"
    directive_prefix = "#PBS"
    job_id_re = re.compile(r"^[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9][A-Za-z0-9.-]*)?$")  # SEQ[.SERVER], arrays SEQ[]
    job_id_example = "4242.pbs01"

    def directives(self, ctx: RenderContext) -> list[str]:
        cfg, site = ctx.config, ctx.site
        out = [
            f"-N {cfg.job_name[:15]}",
            f"-l select={ctx.nodes}{site.select_suffix}",
            f"-l walltime={pbs_time(cfg.walltime)}",
        ]
        if cfg.filesystems:
            out.append(f"-l filesystems={cfg.filesystems}")
        if cfg.account:
            out.append(f"-A {cfg.account}")
        row = ctx.queue
        if row is not None:
            out.append(f"-q {row.partition or row.name}")
        elif cfg.queue:
            out.append(f"-q {cfg.queue}")
        out.extend(site.directives)
        if ctx.stages:
            out.extend(site.storage_directives)
        out.extend(["-j oe", f"-o {ctx.run_dir}/pbs.out"])
        if cfg.pass_env:
            # Names only: qsub copies each value from the submitting environment.
            out.append("-v " + ",".join(cfg.pass_env))
        out.extend(cfg.directives)
        return out

    def start_directives(self, start: StartAfter) -> list[str]:
        """qsub.1B (OpenPBS doc/man1): -W depend=afterany:ID[:ID...],afterok:ID[:ID...];
        -a [[[[CC]YY]MM]DD]hhmm[.SS] (local time)."""
        out = []
        deps = start.dependency_list(self.check_job_id)
        if deps:
            out.append(f"-W depend={deps}")
        if start.begin:
            out.append(f"-a {start.begin:%Y%m%d%H%M.%S}")
        return out

    def submit(self, script_path: str, run_dir: str) -> str:
        proc = run_command(["qsub", script_path], cwd=run_dir, what="qsub")
        job_id = proc.stdout.strip()
        if not job_id:
            raise SchedulerError("qsub printed no job id")
        return job_id

    def status(self, job_ids: list[str], run_dirs: dict | None = None) -> dict[str, JobInfo]:
        """One `qstat -f -F json -x` for all jobs, then plain `qstat -f -x` for those it left out.

        OpenPBS prints only the first job of several in JSON (openpbs/openpbs#2672) and exits 153 when
        one id is unknown, with the others still on stdout; servers without JSON get plain qstat -f.
        """
        try:
            proc = run_command(["qstat", "-f", "-F", "json", "-x", *job_ids], what="qstat", timeout=self.timeout,
                               ok_codes=(0, UNKNOWN_JOB))
            found = parse_qstat_json(proc.stdout) if proc.stdout.strip() else {}
            missing = [j for j in job_ids if not any(_same_job(key, j) for key in found)]
            if missing and proc.returncode == 0:  # left out, not unknown: ask again in plain text
                found.update(self._plain(missing, "-x"))
        except (SchedulerError, ValueError):
            found = self._plain(job_ids)
        out = {}
        for jid in job_ids:
            match = next((info for key, info in found.items() if _same_job(key, jid)), None)
            out[jid] = match or JobInfo(job_id=jid, state=JobState.UNKNOWN)
        return out

    def _plain(self, job_ids: list[str], *flags: str) -> dict[str, JobInfo]:
        try:
            proc = run_command(["qstat", "-f", *flags, *job_ids], what="qstat", timeout=self.timeout,
                               ok_codes=(0, UNKNOWN_JOB))
        except SchedulerError as exc:
            # Torque-style qstat: exit 153 and no message; older PBS: "Invalid job id".
            if not any(m in str(exc) for m in ("Unknown Job Id", "Invalid job id", "exit status 153")):
                raise
            return {}
        return parse_qstat_full(proc.stdout)

    def cancel(self, job_id: str) -> None:
        run_command(["qdel", job_id], what="qdel", timeout=self.timeout, ok_codes=(0, JOB_FINISHED))
