"""Smoke tests proving the test Slurm cluster is real: nodes, /tmp, GPUs, states, PBS, cleanup."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.slurm import CLUSTER_DIR, SlurmCluster

# Every test here needs the real 3-node Slurm cluster (tests/fixtures/slurm.py) or starts one.
pytestmark = pytest.mark.slow

ALL_GPUS = ",".join(str(i) for i in range(8))


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body.lstrip())
    return path


def test_three_node_job_sees_three_distinct_hostnames(slurm_cluster: SlurmCluster, tmp_path):
    script = write_script(tmp_path / "job.sh", """
#SBATCH -N 3 --ntasks-per-node=1 -t 2 -o out.txt
srun hostname
echo "PBS variables: $(env | grep -c '^PBS_')"
""")
    job = slurm_cluster.sbatch(script)
    assert slurm_cluster.wait_state(job, {"COMPLETED"}) == "COMPLETED"
    lines = (tmp_path / "out.txt").read_text().splitlines()
    hostnames = lines[:3]
    assert sorted(hostnames) == sorted(slurm_cluster.nodes)
    assert len(set(hostnames)) == 3
    assert os.uname().nodename not in hostnames
    # The PBS emulation leaves plain Slurm jobs alone.
    assert lines[3] == "PBS variables: 0"


def test_each_node_has_a_private_tmp_and_shares_the_rest(slurm_cluster: SlurmCluster,
                                                          tmp_path):
    marker = f"aegis-private-{os.getpid()}-{time.monotonic_ns()}"
    script = write_script(tmp_path / "job.sh", f"""
#SBATCH -N 3 --ntasks-per-node=1 -t 2 -o out.txt
srun sh -c 'mkdir -p /tmp/{marker} && hostname > /tmp/{marker}/$(hostname)'
srun sh -c 'echo "$(hostname) $(cat /tmp/{marker}/*) $(ls /tmp/{marker} | wc -l)"'
srun sh -c 'hostname > {tmp_path}/shared-$(hostname)'
""")
    job = slurm_cluster.sbatch(script)
    assert slurm_cluster.wait_state(job, {"COMPLETED"}) == "COMPLETED"
    seen = sorted(line.split() for line in (tmp_path / "out.txt").read_text().splitlines())
    # Each node finds only its own file in /tmp/<marker> (a shared /tmp would hold 3).
    assert seen == [[node, node, "1"] for node in sorted(slurm_cluster.nodes)]
    assert not Path("/tmp", marker).exists()
    # pytest's tmp_path (under /tmp/pytest-of-$USER) is shared with every node.
    for node in slurm_cluster.nodes:
        assert (tmp_path / f"shared-{node}").read_text().strip() == node


def test_fake_gpus_are_allocated_per_node(slurm_cluster: SlurmCluster, tmp_path):
    script = write_script(tmp_path / "job.sh", """
#SBATCH -N 3 --gpus-per-node=8 -t 2 -o out.txt
srun --ntasks-per-node=1 sh -c 'echo "$(hostname) $CUDA_VISIBLE_DEVICES"'
srun -N1 -n1 --gres=gpu:2 sh -c 'echo "two $CUDA_VISIBLE_DEVICES"'
""")
    job = slurm_cluster.sbatch(script)
    assert slurm_cluster.wait_state(job, {"COMPLETED"}) == "COMPLETED"
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert sorted(lines[:3]) == [f"{node} {ALL_GPUS}" for node in sorted(slurm_cluster.nodes)]
    assert lines[3] == "two 0,1"
    too_many = slurm_cluster.run("sbatch", "--gpus-per-node=9", str(script), check=False,
                                 cwd=tmp_path)
    assert too_many.returncode == 1
    assert too_many.stderr == ("sbatch: error: Batch job submission failed: "
                               "Requested node configuration is not available\n")


def test_pending_then_running_then_completed(slurm_cluster: SlurmCluster, tmp_path):
    # The first job holds every GPU until told to finish; the second waits for it.
    blocker = slurm_cluster.sbatch(write_script(tmp_path / "blocker.sh", """
#SBATCH -N 3 --gpus-per-node=8 -t 2 -o blocker.out
while [ ! -e go-blocker ]; do sleep 0.1; done
"""))
    waiter = slurm_cluster.sbatch(write_script(tmp_path / "waiter.sh", """
#SBATCH -N 1 --gres=gpu:1 -t 2 -o waiter.out
while [ ! -e go-waiter ]; do sleep 0.1; done
echo done
"""))
    assert slurm_cluster.wait_state(blocker, {"RUNNING"}) == "RUNNING"
    assert slurm_cluster.squeue_state(waiter) == "PENDING"
    deadline = time.monotonic() + 10  # "None" until slurmctld's scheduler has looked at the job
    while True:
        reason = slurm_cluster.run("squeue", "-h", "-j", waiter, "-o", "%r").stdout.strip()
        if reason != "None" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert reason in {"Resources", "Priority"}  # "Priority" until the next scheduling pass
    (tmp_path / "go-blocker").touch()
    assert slurm_cluster.wait_state(waiter, {"RUNNING"}) == "RUNNING"
    (tmp_path / "go-waiter").touch()
    assert slurm_cluster.wait_state(waiter, {"COMPLETED"}) == "COMPLETED"
    assert (tmp_path / "waiter.out").read_text() == "done\n"
    # Accounting has the finished jobs (what a status command falls back to).
    for job in (blocker, waiter):
        out = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode")
        assert out.stdout.strip() == "COMPLETED|0:0"


def test_scancel_ends_a_running_job(slurm_cluster: SlurmCluster, tmp_path):
    job = slurm_cluster.sbatch(write_script(tmp_path / "job.sh", """
#SBATCH -N 2 -t 2 -o out.txt
srun sleep 300
"""))
    assert slurm_cluster.wait_state(job, {"RUNNING"}) == "RUNNING"
    slurm_cluster.run("scancel", job)
    assert slurm_cluster.wait_state(job, {"CANCELLED"}, timeout=30) == "CANCELLED"
    deadline = time.monotonic() + 30
    while slurm_cluster.sacct_state(job) != "CANCELLED" and time.monotonic() < deadline:
        time.sleep(0.2)
    out = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job, "-o", "State")
    assert out.stdout.strip() == "CANCELLED by 0"


def test_failing_job_is_failed_with_its_exit_code(slurm_cluster: SlurmCluster, tmp_path):
    job = slurm_cluster.sbatch(write_script(tmp_path / "job.sh", """
#SBATCH -N 1 -t 2 -o out.txt
echo about to fail
exit 3
"""))
    assert slurm_cluster.wait_state(job, {"FAILED"}) == "FAILED"
    out = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode")
    assert out.stdout.strip() == "FAILED|3:0"
    assert (tmp_path / "out.txt").read_text() == "about to fail\n"


@pytest.mark.parametrize("args, message", [
    (["-p", "nosuch"], "sbatch: error: invalid partition specified: nosuch\n"
                       "sbatch: error: Batch job submission failed: "
                       "Invalid partition name specified\n"),
    (["-A", "nosuch"], "sbatch: error: Batch job submission failed: "
                       "Invalid account or account/partition combination specified\n"),
    (["-t", "2:00:00"], "sbatch: error: Batch job submission failed: Requested time limit "
                        "is invalid (missing or exceeds some limit)\n"),
    (["-N", "4"], "sbatch: error: Batch job submission failed: "
                  "Node count specification invalid\n"),
])
def test_scheduler_refuses_bad_requests_with_a_message(slurm_cluster: SlurmCluster,
                                                       tmp_path, args, message):
    script = write_script(tmp_path / "job.sh", "hostname\n")
    proc = slurm_cluster.run("sbatch", *args, str(script), check=False, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == message
    assert proc.stdout == ""


def test_qsub_select_2_gets_pbs_nodefile_and_jobid(slurm_cluster: SlurmCluster, tmp_path):
    write_script(tmp_path / "job.pbs", """
#PBS -N pbs-smoke
#PBS -l select=2
#PBS -l walltime=00:05:00
#PBS -l place=scatter
#PBS -l filesystems=home
#PBS -A aegis
#PBS -q debug
echo "jobid $PBS_JOBID"
echo "queue $PBS_QUEUE"
echo "name $PBS_JOBNAME"
echo "workdir $PBS_O_WORKDIR"
cat "$PBS_NODEFILE"
""")
    proc = slurm_cluster.run("qsub", "job.pbs", cwd=tmp_path)
    job = proc.stdout.strip()
    assert job.isdigit()
    full = slurm_cluster.run("qstat", "-f", job).stdout
    assert f"Job Id:\t{job}\n" in full
    assert "\tResource_List.nodect = 2\n" in full
    assert slurm_cluster.wait_state(job, {"COMPLETED"}) == "COMPLETED"
    # qsub names the output after the script, whatever -N says.
    lines = (tmp_path / f"job.pbs.o{job}").read_text().splitlines()
    assert lines[:4] == [f"jobid {job}", "queue debug", "name pbs-smoke",
                         f"workdir {tmp_path}"]
    hosts = lines[4:]
    assert len(hosts) == 2 and len(set(hosts)) == 2
    assert set(hosts) <= set(slurm_cluster.nodes)
    assert (tmp_path / f"job.pbs.e{job}").read_text() == ""
    brief = slurm_cluster.run("qstat", job).stdout.splitlines()
    assert brief[2].split()[:2] == [job, "pbs-smoke"] and brief[2].split()[4] == "C"


def test_host_reaches_a_server_on_a_node(slurm_cluster: SlurmCluster, tmp_path):
    node = slurm_cluster.nodes[1]
    token = f"served-from-{node}-{os.getpid()}"
    (tmp_path / "hello.txt").write_text(token)
    port = 18000 + os.getpid() % 1000
    job = slurm_cluster.sbatch(write_script(tmp_path / "job.sh", f"""
#SBATCH -N 1 -w {node} -t 2 -o out.txt
exec {sys.executable} -m http.server --bind 0.0.0.0 --directory {tmp_path} {port}
"""))
    assert slurm_cluster.wait_state(job, {"RUNNING"}) == "RUNNING"
    try:
        for host in (node, slurm_cluster.node_addresses[node]):
            url = f"http://{host}:{port}/hello.txt"
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        assert resp.read().decode() == token
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
    finally:
        slurm_cluster.run("scancel", job)


def test_start_on_a_running_cluster_changes_nothing(slurm_cluster: SlurmCluster):
    before = slurm_cluster.run("scontrol", "show", "config").stdout
    proc = subprocess.run(["bash", str(CLUSTER_DIR / "start.sh")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0
    assert "already running" in proc.stderr
    boot = [line for line in before.splitlines() if line.startswith("BOOT_TIME")]
    after = slurm_cluster.run("scontrol", "show", "config").stdout
    assert boot and boot[0] in after.splitlines()


# A second, small cluster next to the session's one, to prove stop.sh cleans up.
SECOND = {
    "AEGIS_SLURM_STATE": "/var/tmp/aegis-slurm-cluster-cleanup-test",
    "AEGIS_SLURM_LINK_PREFIX": "aegct",
    "AEGIS_SLURM_NODE_PREFIX": "ctnode",
    "AEGIS_SLURM_NET": "10.78.0",
    "AEGIS_SLURM_PORT_BASE": "16917",
    "AEGIS_SLURM_NODES": "2",
    "AEGIS_SLURM_LINK_ETC": "0",
}


def leftovers(env: dict[str, str]) -> list[str]:
    """What a cluster configured by `env` has left on the machine."""
    prefix, state = env["AEGIS_SLURM_LINK_PREFIX"], env["AEGIS_SLURM_STATE"]
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines()
              if line.startswith(prefix + "-")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {line.split(': ')[1]}" for line in links.splitlines()
              if line.split(": ")[1].startswith(prefix + "-")]
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if proc.name.isdigit() and state + "/" in cmdline:
            found.append(f"process {proc.name}: {cmdline}")
    if f"aegis-slurm-cluster:{prefix}:" in Path("/etc/hosts").read_text():
        found.append("/etc/hosts lines")
    if Path(state).exists():
        found.append(f"directory {state}")
    return found


def run_script(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_DIR / name), *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, **env), check=False)


def test_stop_leaves_nothing_after_a_failed_start():
    env = dict(SECOND, AEGIS_SLURM_TMP_SIZE="not-a-size")  # the nodes' /tmp mount fails
    try:
        proc = run_script("start.sh", env)
        assert proc.returncode != 0
        assert "start failed" in proc.stderr
        assert leftovers(env) == []
    finally:
        run_script("stop.sh", env)


def test_stop_leaves_nothing_after_a_full_run_without_accounting():
    env = dict(SECOND, AEGIS_SLURM_ACCOUNTING="0")
    try:
        proc = run_script("start.sh", env)
        assert proc.returncode == 0, proc.stderr
        conf = {"SLURM_CONF": f"{env['AEGIS_SLURM_STATE']}/etc/slurm.conf"}
        out = subprocess.run(["srun", "-N2", "hostname"], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, **conf), check=True, cwd="/")
        assert sorted(out.stdout.split()) == ["ctnode1", "ctnode2"]
        assert leftovers(env) != []
    finally:
        proc = run_script("stop.sh", env)
    assert proc.returncode == 0, proc.stderr
    assert leftovers(env) == []
