"""No scheduler: the job script runs on this machine in the background, in its own session."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from aegis.errors import SchedulerError
from aegis.schedulers.base import JobInfo, JobState, RenderContext, Scheduler

# The wrapper records the script's exit status so `aegis status` can tell completed from failed.
# A TERM sent to the job's process group reaches the script; the wrapper survives it to record the status.
WRAPPER = ('term=0; pid=; trap \'term=1; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null\' TERM INT; '
           ': > "$2.started"; '
           'bash "$1" & pid=$!; [ "$term" = 1 ] && kill -TERM "$pid" 2>/dev/null; '
           'wait "$pid"; rc=$?; while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done; '
           'echo "$rc" > "$2.tmp" && mv "$2.tmp" "$2"; exit "$rc"')
EXIT_FILE = "exit_code"


class LocalScheduler(Scheduler):
    name = "local"
    template = "local.sh.j2"
    directive_prefix = "#"

    def directives(self, ctx: RenderContext) -> list[str]:
        return []

    def submit(self, script_path: str, run_dir: str) -> str:
        import subprocess

        out_path = os.path.join(run_dir, "job.out")
        try:
            with open(out_path, "ab") as out:
                proc = subprocess.Popen(
                    ["bash", "-c", WRAPPER, "aegis-local-job", script_path, os.path.join(run_dir, EXIT_FILE)],
                    cwd=run_dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)
        except OSError as exc:
            raise SchedulerError(f"cannot start {script_path}: {exc.strerror}") from None
        started = os.path.join(run_dir, EXIT_FILE + ".started")
        deadline = time.monotonic() + 10
        while not os.path.exists(started) and time.monotonic() < deadline and self._running(proc.pid):
            time.sleep(0.005)  # until the wrapper's trap is in place, a cancel could lose the status
        create = psutil.Process(proc.pid).create_time()
        Path(run_dir, "local_job").write_text(f"{proc.pid} {create}\n")
        return f"local-{proc.pid}"

    @staticmethod
    def _running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    @staticmethod
    def _alive(job_id: str, run_dir: str | None) -> bool:
        pid = int(job_id.split("-", 1)[1])
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            if run_dir and os.path.exists(os.path.join(run_dir, "local_job")):
                recorded = float(Path(run_dir, "local_job").read_text().split()[1])
                return abs(proc.create_time() - recorded) < 1.0  # not a recycled pid
            return True
        except (psutil.NoSuchProcess, ValueError, IndexError):
            return False

    def status(self, job_ids: list[str], run_dirs: dict[str, str] | None = None) -> dict[str, JobInfo]:
        out = {}
        for job_id in job_ids:
            run_dir = (run_dirs or {}).get(job_id)
            if not job_id.startswith("local-"):
                out[job_id] = JobInfo(job_id=job_id, state=JobState.UNKNOWN)
            elif self._alive(job_id, run_dir):
                out[job_id] = JobInfo(job_id=job_id, state=JobState.RUNNING, raw_state="running",
                                      nodes="localhost")
            elif run_dir and os.path.exists(os.path.join(run_dir, EXIT_FILE)):
                code = Path(run_dir, EXIT_FILE).read_text().strip()
                state = JobState.COMPLETED if code == "0" else (
                    JobState.CANCELLED if code in ("143", "130", "137") else JobState.FAILED)
                out[job_id] = JobInfo(job_id=job_id, state=state, raw_state=f"exit {code}", exit_code=code)
            else:
                out[job_id] = JobInfo(job_id=job_id, state=JobState.UNKNOWN)
        return out

    def cancel(self, job_id: str) -> None:
        """SIGTERM to the job's own process group (its session), not by name."""
        pid = int(job_id.split("-", 1)[1])
        if not self._alive(job_id, None):
            raise SchedulerError(f"job {job_id} is not running")
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            raise SchedulerError(f"job {job_id} is not running") from None
