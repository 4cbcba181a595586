"""No scheduler: the job script runs on this machine in the background."""
from __future__ import annotations

import os
import subprocess

from aegis.errors import SchedulerError
from aegis.schedulers.base import RenderContext, Scheduler


class LocalScheduler(Scheduler):
    name = "local"
    template = "local.sh.j2"
    directive_prefix = "#"

    def directives(self, ctx: RenderContext) -> list[str]:
        return []

    def submit(self, script_path: str, run_dir: str) -> str:
        out_path = os.path.join(run_dir, "job.out")
        try:
            with open(out_path, "ab") as out:
                proc = subprocess.Popen(["bash", script_path], cwd=run_dir, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        except OSError as exc:
            raise SchedulerError(f"cannot start {script_path}: {exc.strerror}") from None
        return f"local-{proc.pid}"
