"""PBS Pro: #PBS directives, qsub."""
from __future__ import annotations

from aegis.config import walltime_seconds
from aegis.schedulers.base import RenderContext, Scheduler, run_command


def pbs_time(walltime: str) -> str:
    """Seconds -> PBS's HH:MM:SS (hours may exceed 24)."""
    secs = walltime_seconds(walltime)
    return f"{secs // 3600:02d}:{secs % 3600 // 60:02d}:{secs % 60:02d}"


class PBSScheduler(Scheduler):
    name = "pbs"
    template = "pbs.sh.j2"
    directive_prefix = "#PBS"

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
        if cfg.queue:
            out.append(f"-q {cfg.queue}")
        out.extend(site.directives)
        out.extend(["-j oe", f"-o {ctx.run_dir}/pbs.out"])
        if cfg.pass_env:
            # Names only: qsub copies each value from the submitting environment.
            out.append("-v " + ",".join(cfg.pass_env))
        out.extend(cfg.directives)
        return out

    def submit(self, script_path: str, run_dir: str) -> str:
        proc = run_command(["qsub", script_path], cwd=run_dir, what="qsub")
        return proc.stdout.strip()
