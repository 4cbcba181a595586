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
