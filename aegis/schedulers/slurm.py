"""Slurm: #SBATCH directives, sbatch --parsable, squeue (then sacct), scancel."""
from __future__ import annotations

import re

from aegis.config.schema import walltime_seconds
from aegis.errors import SchedulerError
from aegis.schedulers.base import JobInfo, JobState, RenderContext, Scheduler, run_command
from aegis.schedulers.deps import StartAfter

# Slurm's job states (squeue %T / sacct State) -> the normalised JobState.
STATES = {
    "PENDING": JobState.PENDING, "CONFIGURING": JobState.PENDING, "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING, "REQUEUE_HOLD": JobState.PENDING, "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING, "STOPPED": JobState.PENDING, "RESIZING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING, "SIGNALING": JobState.RUNNING, "STAGE_OUT": JobState.COMPLETING,
    "COMPLETING": JobState.COMPLETING, "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED, "NODE_FAIL": JobState.FAILED, "BOOT_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED, "DEADLINE": JobState.TIMEOUT, "PREEMPTED": JobState.FAILED,
    "REVOKED": JobState.CANCELLED, "SPECIAL_EXIT": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED, "TIMEOUT": JobState.TIMEOUT,
}


def slurm_time(walltime: str) -> str:
    """Seconds -> Slurm's [D-]HH:MM:SS."""
    secs = walltime_seconds(walltime)
    days, rem = divmod(secs, 86400)
    text = f"{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}"
    return f"{days}-{text}" if days else text


def normalise_state(raw: str) -> JobState:
    """'CANCELLED by 0' -> CANCELLED; unknown names -> UNKNOWN."""
    word = raw.strip().split(" ")[0].rstrip("+").upper()
    return STATES.get(word, JobState.UNKNOWN)


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """Lines of `squeue --noheader --format=%i|%T|%r|%N`."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 4 or not parts[0]:
            continue
        job_id, state, reason, nodes = parts[:4]
        out[job_id] = JobInfo(job_id=job_id, state=normalise_state(state), raw_state=state,
                              reason="" if reason in ("None", "(null)") else reason,
                              nodes="" if nodes in ("", "(null)") else nodes)
    return out


def parse_sacct(text: str) -> dict[str, JobInfo]:
    """Lines of `sacct --noheader --parsable2 --format=JobID,State,ExitCode,NodeList` (steps skipped)."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 4 or not parts[0] or "." in parts[0]:
            continue
        job_id, state, exit_code, nodes = parts[:4]
        out[job_id] = JobInfo(job_id=job_id, state=normalise_state(state), raw_state=state,
                              exit_code=exit_code, nodes="" if nodes in ("None assigned", "(null)") else nodes)
    return out


class SlurmScheduler(Scheduler):
    name = "slurm"
    template = "slurm.sh.j2"
    directive_prefix = "#SBATCH"
    job_id_re = re.compile(r"^[0-9]+(_[0-9]+)?$")  # JOBID, or ARRAYID_TASK
    job_id_example = "4242"

    def directives(self, ctx: RenderContext) -> list[str]:
        cfg, site = ctx.config, ctx.site
        out = [
            f"--job-name={cfg.job_name}",
            f"--nodes={ctx.nodes}",
            "--ntasks-per-node=1",
            f"--time={slurm_time(cfg.walltime)}",
        ]
        if cfg.account:
            out.append(f"--account={cfg.account}")
        row = ctx.queue
        if row is not None:
            out.append(f"--partition={row.partition or row.name}")
            if row.qos:
                out.append(f"--qos={row.qos}")
        elif cfg.queue:
            out.append(f"--partition={cfg.queue}")
        if site.gpus_directive:
            out.append(f"--gpus-per-node={site.devices_per_node}")
        out.append(f"--output={ctx.run_dir}/slurm-%j.out")
        out.extend(site.directives)
        if ctx.stages:
            out.extend(site.storage_directives)
        out.extend(cfg.directives)
        return out

    def start_directives(self, start: StartAfter) -> list[str]:
        """sbatch(1): --dependency=afterany:ID[:ID...],afterok:ID[:ID...];
        --begin=YYYY-MM-DD[THH:MM[:SS]] (local time)."""
        out = []
        deps = start.dependency_list(self.check_job_id)
        if deps:
            out.append(f"--dependency={deps}")
        if start.begin:
            out.append(f"--begin={start.begin:%Y-%m-%dT%H:%M:%S}")
        return out

    def submit(self, script_path: str, run_dir: str) -> str:
        proc = run_command(["sbatch", "--parsable", script_path], cwd=run_dir, what="sbatch")
        job_id = proc.stdout.strip().split(";")[0]
        if not job_id:
            raise SchedulerError("sbatch printed no job id")
        return job_id

    def status(self, job_ids: list[str], run_dirs: dict | None = None) -> dict[str, JobInfo]:
        """One squeue call for all jobs; those that left the queue are asked of sacct."""
        found: dict[str, JobInfo] = {}
        try:
            proc = run_command(["squeue", "--noheader", f"--jobs={','.join(job_ids)}",
                                "--format=%i|%T|%r|%N"], what="squeue", timeout=self.timeout)
            found = parse_squeue(proc.stdout)
        except SchedulerError as exc:
            # squeue exits 1 for an id it no longer knows; anything else is real trouble.
            if "Invalid job id" not in str(exc):
                raise
        missing = [j for j in job_ids if j not in found]
        if missing:
            try:
                proc = run_command(["sacct", "--noheader", "--parsable2", "--allocations",
                                    f"--jobs={','.join(missing)}", "--format=JobID,State,ExitCode,NodeList"],
                                   what="sacct", timeout=self.timeout)
                found.update(parse_sacct(proc.stdout))
            except SchedulerError:
                pass  # no accounting: the job is reported as unknown below
        return {j: found.get(j, JobInfo(job_id=j, state=JobState.UNKNOWN)) for j in job_ids}

    def cancel(self, job_id: str) -> None:
        run_command(["scancel", job_id], what="scancel", timeout=self.timeout)
