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
the node), one cluster per instance, and `vllm serve` behind aegis_raywait.py, which
waits until the cluster has every node and device.

Each cluster has ports of its own, so two clusters can share a node: a block of PORTS
ports from the instance's rendezvous port (its serving port + 20000), which placement
reserves (aegis.plan.placement.assign_ports). Ray's own choices would clash: the client
server's 10001 (when ray[client] is installed), the dashboard's 8265, the dashboard agent's
52365, the worker range 10002-19999 of older Rays. The head node (node rank 0) and the
other nodes use different parts of the block, so even a head and a worker of one cluster
can share a host. The session files (and Ray's AF_UNIX sockets) go to a folder per
cluster and node rank under the node's RAY_TMPDIR or TMPDIR, or /tmp when that path would
be too long for a socket (ALCF's known issue; ALCF's scripts set RAY_TMPDIR=/tmp).
"""
from __future__ import annotations

import os

from aegis.engines.base import EngineLaunch

WAIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard", "aegis_raywait.py")
START_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard", "aegis_raystart.py")
WAIT_TIMEOUT = 600  # seconds the head waits for the other nodes' Ray before it gives up (then restarted)
RAY_TMP = "/tmp"  # the fallback root of the session folders (ALCF: RAY_TMPDIR=/tmp)
# Ray's longest AF_UNIX path is TEMP/session_<date>_<pid>/sockets/plasma_store: TEMP + 64 bytes of at most 107.
TEMP_DIR_MAX = 40

# The block of ports of one Ray cluster, from its first port (the rendezvous port): `ray start` flags in order.
HEAD_PORTS = ("--port", "--ray-client-server-port", "--dashboard-port")  # the head node only (GCS first)
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--runtime-env-agent-port",
              "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--metrics-export-port")
WORKER_PORTS = 256  # per node: Ray prestarts --num-cpus idle workers and adds one per actor (vLLM: one per device)
NODE_BLOCK = len(NODE_PORTS) + WORKER_PORTS
PORTS = len(HEAD_PORTS) + 2 * NODE_BLOCK  # the head node's part, then the part every other node uses


def address(launch: EngineLaunch) -> str:
    """The Ray cluster's address: the head node's serving name and the instance's rendezvous port."""
    return f"{launch.master_addr}:{launch.master_port}"


def ports(first: int, node_rank: int) -> dict[str, int]:
    """`ray start` flag -> port, for node `node_rank` of the cluster whose block starts at `first`
    (--min-worker-port and --max-worker-port: the range its workers bind in)."""
    out: dict[str, int] = {}
    if node_rank == 0:
        out.update({flag: first + i for i, flag in enumerate(HEAD_PORTS)})
    base = first + len(HEAD_PORTS) + (0 if node_rank == 0 else NODE_BLOCK)
    out.update({flag: base + i for i, flag in enumerate(NODE_PORTS)})
    low = base + len(NODE_PORTS)
    out.update({"--min-worker-port": low, "--max-worker-port": low + WORKER_PORTS - 1})
    return out


def port_range(first: int) -> tuple[int, int]:
    """The first and last port of the cluster's block."""
    return first, first + PORTS - 1


def temp_root(env: dict[str, str]) -> str:
    """Where this node's Ray session folders go: RAY_TMPDIR, else TMPDIR, of the rank's environment, else /tmp."""
    return env.get("RAY_TMPDIR") or env.get("TMPDIR") or RAY_TMP


def temp_dir(launch: EngineLaunch) -> str:
    """Ray's session files of this node's part: one folder per cluster and node rank (two on one host do not
    mix), under launch.tmpdir unless that path is too long for Ray's sockets (then under /tmp)."""
    name = f"aegis-ray-{launch.master_port}-{launch.node_rank}"
    root = launch.tmpdir if os.path.isabs(launch.tmpdir or "") else RAY_TMP
    path = os.path.join(root, name)
    return path if len(path.encode()) <= TEMP_DIR_MAX else os.path.join(RAY_TMP, name)


def start_argv(launch: EngineLaunch) -> list[str]:
    """`ray start` of this node: the head (node rank 0) or a worker joining it; blocks while Ray runs.

    The head's runs through aegis_raystart.py, which drops --ray-client-server-port where the engine's Ray
    has no client package (Ray refuses the flag there, and starts no client server).
    """
    assert launch.master_port is not None
    argv = [launch.script("ray"), "start"]
    if launch.node_rank == 0:
        argv = [launch.python, START_SCRIPT, *argv, "--head", "--include-dashboard", "false"]
    else:
        argv += ["--address", address(launch)]
    argv += ["--node-ip-address", launch.node_ip or launch.host, "--num-gpus", str(launch.devices_per_node)]
    if launch.cpus:
        argv += ["--num-cpus", str(launch.cpus)]
    for flag, port in ports(launch.master_port, launch.node_rank).items():
        argv += [flag, str(port)]
    return argv + ["--temp-dir", temp_dir(launch), "--disable-usage-stats", "--block"]


def wait_argv(launch: EngineLaunch, server: list[str]) -> list[str]:
    """`server` behind the wait for the whole cluster: every node and every device of the instance."""
    argv = [launch.python, WAIT_SCRIPT, "--address", address(launch), "--nodes", str(launch.nnodes),
            "--gpus", str(launch.devices_per_node * launch.nnodes), "--timeout", str(WAIT_TIMEOUT)]
    for host in launch.node_hosts:
        argv += ["--host", host]
    return argv + ["--", *server]
