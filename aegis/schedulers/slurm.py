"""Slurm: #SBATCH directives, sbatch --parsable."""
from __future__ import annotations

from aegis.config import walltime_seconds
from aegis.schedulers.base import RenderContext, Scheduler, run_command


def slurm_time(walltime: str) -> str:
    """Seconds -> Slurm's [D-]HH:MM:SS."""
    secs = walltime_seconds(walltime)
    days, rem = divmod(secs, 86400)
    text = f"{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}"
    return f"{days}-{text}" if days else text


class SlurmScheduler(Scheduler):
    name = "slurm"
    template = "slurm.sh.j2"
    directive_prefix = "#SBATCH"

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
        if cfg.queue:
            out.append(f"--partition={cfg.queue}")
        if site.gpus_directive:
            out.append(f"--gpus-per-node={site.devices_per_node}")
        out.append(f"--output={ctx.run_dir}/slurm-%j.out")
        out.extend(site.directives)
        out.extend(cfg.directives)
        return out

    def submit(self, script_path: str, run_dir: str) -> str:
        proc = run_command(["sbatch", "--parsable", script_path], cwd=run_dir, what="sbatch")
        return proc.stdout.strip().split(";")[0]
