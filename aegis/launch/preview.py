"""What a job will run, before it runs: the launcher step, each rank's argv, environment, cores (`plan --commands`).

The commands come from the code the agents run (`build_ranks`), given shell rules for
the facts only a node knows: its host name (`${NODE_i}`), the addresses of its network
interfaces, the run directory (`$AEGIS_RUN_DIR`) and the run's API key (read from its
0600 file, never printed).
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from aegis.config.schema import Config
from aegis.config.sites import Site, format_ranges
from aegis.launch.cli import agent_argv
from aegis.launch.ranks import build_ranks
from aegis.launch.steps import per_node_step
from aegis.plan.placement import Plan
from aegis.rundir import RunDir

RUN_DIR = "$AEGIS_RUN_DIR"
KEY = '$(cat "$AEGIS_RUN_DIR/api_key")'
HOSTS = {  # how to fill NODE_0.. in an interactive allocation of each scheduler
    "pbs": 'mapfile -t H < <(sort -u "$PBS_NODEFILE")',
    "slurm": 'mapfile -t H < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
    "local": "H=(localhost)",
}


def node_var(index: int) -> str:
    return f"${{NODE_{index}}}"


def ipv4_of(address: str) -> str:
    """The shell rule for the IPv4 address a name resolves to (as ALCF's vLLM pages look up VLLM_HOST_IP)."""
    return f"$(getent ahostsv4 {address} | awk 'NR==1{{print $1}}')"


def interface_carrying(address: str) -> str:
    return f"$(ip -o -4 addr show to {ipv4_of(address)} | awk '{{print $2}}')"


def network_rule(address: str) -> tuple[str, str]:
    """(interface, IPv4) rules for `build_ranks`' network lookup."""
    return interface_carrying(address), ipv4_of(address)


def interface_address(interface: str) -> str:
    return f"$(ip -o -4 addr show {interface} | awk '{{print $4}}' | cut -d/ -f1)"


def shell_value(value: str) -> str:
    """A value as the shell should see it: the rules above expand (inside double quotes, a command
    substitution is parsed as a command of its own), anything else is literal."""
    if "$AEGIS_RUN_DIR" in value or "${NODE_" in value or "$(" in value:
        return f'"{value}"'
    return shlex.quote(value)


def shell_argv(argv: list[str]) -> str:
    return " ".join(shell_value(a) for a in argv)


def commands(site: Site, cfg: Config, plan: Plan, nodes: int) -> dict[str, Any]:
    """The launcher step and, per node, each rank: argv, the environment aegis sets, cores, log."""
    site = site.resolved()
    run = RunDir(Path(RUN_DIR))
    hosts = [node_var(i) for i in range(nodes)]
    addresses = [site.serve_address.address(h) for h in hosts]
    iface = site.serve_address.interface
    mine = interface_address(iface) if site.serve_address.method == "interface" and iface else None
    agent = agent_argv(RUN_DIR)
    key = KEY if cfg.api_key else None
    out: dict[str, Any] = {"site": site.name, "scheduler": site.scheduler, "nodes": nodes,
                           "hosts": HOSTS[site.scheduler], "launch_step": {"argv": per_node_step(site, nodes, agent)},
                           "node_list": []}
    for index in range(nodes):
        ranks = build_ranks(run, index, site, cfg, plan, addresses, key, base_env={}, my_address=mine,
                            network=network_rule, write=False)
        out["node_list"].append({"node": index, "host": hosts[index], "ranks": [
            {"instance": r.instance, "rank": r.rank, "part": r.part, "argv": r.argv, "env": r.env,
             "cpus": format_ranges(r.cpus), "log": RUN_DIR + str(r.log)[len(str(run.path)):]} for r in ranks]})
    return out


def render(doc: dict[str, Any]) -> str:
    """The commands as shell lines a user can paste into an interactive allocation."""
    n = doc["nodes"]
    lines = [f"# What the job runs on site {doc['site']} ({n} node{'s' if n != 1 else ''}): aegis plan --commands.",
             "# In an interactive allocation: set the run directory and the node names, then run each",
             "# node's lines on that node (the job's agents do exactly this, and restart what dies).",
             'export AEGIS_RUN_DIR="${AEGIS_RUN_DIR:?set it to a run directory (aegis submit writes one)}"',
             doc["hosts"]]
    lines += [f"NODE_{i}=${{H[{i}]}}" for i in range(n)]
    lines += ["", "# The launcher step of the job script: one agent per node.",
              shell_argv(doc["launch_step"]["argv"])]
    for node in doc["node_list"]:
        lines += ["", f"# --- node {node['node']} ({node['host']}): {len(node['ranks'])} process(es)"]
        for rank in node["ranks"]:
            env = " ".join(f"{k}={shell_value(v)}" for k, v in sorted(rank["env"].items()))
            pin = f"taskset -c {rank['cpus']} " if rank["cpus"] else ""
            part = f" ({rank['part']})" if rank.get("part") else ""
            lines += [f"# {rank['instance']} rank {rank['rank']}{part}",
                      f"{pin}env {env} {shell_argv(rank['argv'])} >> {shell_value(rank['log'])} 2>&1 &"]
    return "\n".join(lines) + "\n"
