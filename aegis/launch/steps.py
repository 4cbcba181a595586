"""Launchers: wrap a command so that it runs once on each node of the allocation, in one step."""
from __future__ import annotations

from aegis.config.sites import Site


def per_node_step(site: Site, nodes: int, command: list[str]) -> list[str]:
    """The argv of one launcher step running `command` once per node on `nodes` nodes."""
    if site.launcher == "srun":
        return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
                "--kill-on-bad-exit=0", *site.launcher_args, *command]
    if site.launcher == "mpiexec":
        return ["mpiexec", "-n", str(nodes), *site.launcher_args, *command]
    return list(command)  # local: this machine is the only node


def one_node_step(site: Site, host: str, command: list[str]) -> list[str]:
    """The argv of a step running `command` once on `host` only, next to a step that is still running there.

    srun: `--overlap` lets it share the CPUs the first step still holds on that node (Slurm >= 20.11,
    sbatch/srun man pages). mpiexec: the site's host-selection flag (`launcher_host_args`: PALS and
    MPICH `--hosts`, Open MPI `--host`).
    """
    if site.launcher == "srun":
        return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", "--overlap", "--kill-on-bad-exit=0",
                *site.launcher_args, *command]
    if site.launcher == "mpiexec":
        return ["mpiexec", "-n", "1", *[a.replace("{host}", host) for a in site.launcher_host_args],
                *site.launcher_args, *command]
    return list(command)
