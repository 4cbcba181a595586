"""Ray clusters for vLLM instances that span nodes: the `ray start` of each node and the wait before `vllm serve`.

What ALCF documents for multi-node vLLM on Aurora and Polaris (user-guides
docs/aurora/data-science/inference/vllm.md, "Serving Large Models on Multiple Tiles and
Nodes", and its setup_ray_cluster.sh): the first node runs `ray start --head
--node-ip-address <its high-speed-network IP> --num-gpus N --num-cpus C`, the others
`ray start --address <head>:<port>` likewise, `ray status` shows every node, then the head
runs `vllm serve ... --tensor-parallel-size T --pipeline-parallel-size P
--distributed-executor-backend ray`. aegis runs each `ray start` with `--block` as a
supervised process of the node's agent (its own process group: the GCS, raylet and
agents it starts stay in it and end with it; `ray stop` would end every Ray cluster on
the node), one cluster per instance on the instance's rendezvous port, and `vllm serve`
behind aegis_raywait.py, which waits until the cluster has every node and device.
"""
from __future__ import annotations

import os

from aegis.engines.base import EngineLaunch

WAIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard", "aegis_raywait.py")
WAIT_TIMEOUT = 600  # seconds the head waits for the other nodes' Ray before it gives up (then restarted)
RAY_TMP = "/tmp"  # ALCF: --temp-dir=/tmp (AF_UNIX paths under a long TMPDIR are too long)


def address(launch: EngineLaunch) -> str:
    """The Ray cluster's address: the head node's serving name and the instance's rendezvous port."""
    return f"{launch.master_addr}:{launch.master_port}"


def temp_dir(launch: EngineLaunch) -> str:
    """Ray's session files of this node's part: one folder per cluster and node (two on one host do not mix)."""
    return os.path.join(RAY_TMP, f"aegis-ray-{launch.master_port}-{launch.node_rank}")


def start_argv(launch: EngineLaunch) -> list[str]:
    """`ray start` of this node: the head (node rank 0) or a worker joining it; blocks while Ray runs."""
    argv = [launch.script("ray"), "start"]
    if launch.node_rank == 0:
        argv += ["--head", "--port", str(launch.master_port), "--include-dashboard", "false"]
    else:
        argv += ["--address", address(launch)]
    argv += ["--node-ip-address", launch.node_ip or launch.host, "--num-gpus", str(launch.devices_per_node)]
    if launch.cpus:
        argv += ["--num-cpus", str(launch.cpus)]
    # Every other port Ray opens is chosen free by Ray (0); the dashboard agent's default (52365) is fixed.
    return argv + ["--dashboard-agent-listen-port", "0", "--temp-dir", temp_dir(launch), "--disable-usage-stats",
                   "--block"]


def wait_argv(launch: EngineLaunch, server: list[str]) -> list[str]:
    """`server` behind the wait for the whole cluster: every node and every device of the instance."""
    argv = [launch.python, WAIT_SCRIPT, "--address", address(launch), "--nodes", str(launch.nnodes),
            "--gpus", str(launch.devices_per_node * launch.nnodes), "--timeout", str(WAIT_TIMEOUT)]
    for host in launch.node_hosts:
        argv += ["--host", host]
    return argv + ["--", *server]
