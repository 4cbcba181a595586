"""aegis against a real 3-node Slurm cluster (tests/cluster): submit, wait, status, cancel, refusals, PBS."""
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aegis.schedulers.base import JobState, Poller
from aegis.schedulers.pbs import PBSScheduler
from aegis.schedulers.slurm import SlurmScheduler

SITES = Path(__file__).parent / "sites"
pytestmark = pytest.mark.slow


def aegis(cluster, *args, cwd=None, timeout=600):
    env = {**os.environ, **cluster.env}
    return subprocess.run([sys.executable, "-m", "aegis", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def config(tmp_path, name="c.yaml", **raw):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model": "org/model", **raw}))
    return path


def test_check_job_spans_three_nodes(slurm_cluster, tmp_path):
    cfg = config(tmp_path, instances=3, tensor_parallel_size=8)  # one instance per node: 3 nodes
    run = tmp_path / "run"
    proc = aegis(slurm_cluster, "submit", cfg, "--site-file", SITES / "testcluster.yaml", "--run-dir", run,
                 "--check", "--wait", "--timeout", "240")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = (run / "job.sh").read_text()
    assert "#SBATCH --nodes=3" in script and "#SBATCH --gpus-per-node=8" in script
    reports = [json.loads(p.read_text()) for p in sorted((run / "nodes").glob("*.json"))]
    assert sorted(r["host"] for r in reports) == ["node1", "node2", "node3"]  # a step ran on each node
    assert [r["index"] for r in reports] == [0, 1, 2]
    assert all(r["visible"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" for r in reports)
    alloc = json.loads((run / "allocation.json").read_text())
    assert alloc["scheduler"] == "slurm" and alloc["hosts"] == ["node1", "node2", "node3"]
    status = json.loads(aegis(slurm_cluster, "status", run, "--json").stdout)
    assert status["state"] == "completed" and status["log"].endswith(f"slurm-{status['job_id']}.out")


def test_pending_running_completed_and_cancel(slurm_cluster, tmp_path, sleeper):
    site = SITES / "testcluster.yaml"
    blocker = config(tmp_path, "blocker.yaml", instances=3, tensor_parallel_size=8, engine_python=str(sleeper),
                     startup_timeout=600)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    proc = aegis(slurm_cluster, "submit", blocker, "--site-file", site, "--run-dir", run_a, "--json")
    assert proc.returncode == 0, proc.stderr
    job_a = json.loads(proc.stdout)["job_id"]
    sched = SlurmScheduler()
    os.environ.update(slurm_cluster.env)
    deadline = time.monotonic() + 120
    while sched.status([job_a])[job_a].state != JobState.RUNNING:
        assert time.monotonic() < deadline, "blocker never ran"
        time.sleep(0.5)
    # Wait until the blocker's engines run on all three nodes (the agents started them).
    deadline = time.monotonic() + 120
    while len(list((run_a / "nodes").glob("*.status.json"))) < 3:
        assert time.monotonic() < deadline, "agents did not report"
        time.sleep(0.5)
    checker = config(tmp_path, "check.yaml", instances=3, tensor_parallel_size=8)
    proc = aegis(slurm_cluster, "submit", checker, "--site-file", site, "--run-dir", run_b, "--check", "--json")
    job_b = json.loads(proc.stdout)["job_id"]
    poller = Poller(sched, first=0.2, longest=0.5)
    seen = []
    info = poller.poll([job_b])[job_b]
    seen.append(info.state)
    assert info.state == JobState.PENDING  # waiting for the blocker's nodes
    # Cancel the running blocker: it ends as cancelled and its engines are gone from every node.
    assert aegis(slurm_cluster, "cancel", run_a).returncode == 0
    deadline = time.monotonic() + 120
    while True:
        state = sched.status([job_a])[job_a].state
        if state == JobState.CANCELLED:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-f", str(sleeper)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "engines left behind after cancel"
        time.sleep(0.5)
    # The pending job now runs and completes.
    deadline = time.monotonic() + 180
    while not seen or not seen[-1].finished:
        assert time.monotonic() < deadline
        seen.append(poller.poll([job_b])[job_b].state)
        poller.wait()
    states = [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]
    assert states[0] == JobState.PENDING and states[-1] == JobState.COMPLETED
    assert JobState.RUNNING in states or JobState.COMPLETING in states
    assert json.loads((run_b / "check.json").read_text())["ok"] is True


@pytest.mark.parametrize("flags,message", [
    (["--queue", "nosuch"], "sbatch failed: sbatch: error: invalid partition specified: nosuch"),
    (["--account", "nosuch"], "Invalid account or account/partition combination specified"),
    (["--walltime", "02:00:00"], "Requested time limit is invalid (missing or exceeds some limit)"),
])
def test_refused_job_is_one_clear_line(slurm_cluster, tmp_path, flags, message):
    run = tmp_path / "run"
    proc = aegis(slurm_cluster, "submit", config(tmp_path), "--site-file", SITES / "testcluster.yaml",
                 "--run-dir", run, *flags)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aegis: error: ") and message in lines[0]
    assert not (run / "job_id").exists()


def test_failed_job_reports_failed_with_its_log(slurm_cluster, tmp_path):
    # The engine cannot start on the nodes (this Python has no vLLM); with no restarts the run fails.
    cfg = config(tmp_path, instances=2, tensor_parallel_size=8, engine_python=sys.executable, max_restarts=0)
    run = tmp_path / "run"
    proc = aegis(slurm_cluster, "submit", cfg, "--site-file", SITES / "testcluster.yaml", "--run-dir", run,
                 "--wait", "--timeout", "240")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    job_id = (run / "job_id").read_text().strip()
    last = proc.stderr.strip().splitlines()[-1]
    assert f"job {job_id} ended (failed" in last and f"log: {run / f'slurm-{job_id}.out'}" in last
    doc = json.loads((run / "endpoints.json").read_text())
    assert doc["state"] == "failed" and all("No module named" in i["error"] for i in doc["instances"])
    assert "every instance failed" in (run / f"slurm-{job_id}.out").read_text()


def test_interactive_allocation_finds_its_nodes(slurm_cluster, tmp_path):
    cfg = config(tmp_path, instances=2, tensor_parallel_size=8)
    run = tmp_path / "run"
    proc = subprocess.run(["salloc", "-N2", "-A", "aegis", "-t", "5", sys.executable, "-m", "aegis", "launch",
                           str(cfg), "--site-file", str(SITES / "testcluster.yaml"), "--check", "--run-dir",
                           str(run)], capture_output=True, text=True, env={**os.environ, **slurm_cluster.env},
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "all 2 node(s) answered" in proc.stdout
    assert json.loads((run / "allocation.json").read_text())["hosts"] == ["node1", "node2"]


def test_pbs_backend_through_the_wrappers(slurm_cluster, tmp_path):
    cfg = config(tmp_path, instances=2, tensor_parallel_size=8)
    run = tmp_path / "run"
    proc = aegis(slurm_cluster, "submit", cfg, "--site-file", SITES / "testcluster-pbs.yaml", "--run-dir", run,
                 "--check", "--wait", "--timeout", "240", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = (run / "job.sh").read_text()
    assert "#PBS -l select=2" in script and "#PBS -A aegis" in script
    alloc = json.loads((run / "allocation.json").read_text())
    job_id = (run / "job_id").read_text().strip()
    assert alloc["scheduler"] == "pbs" and alloc["job_id"] == job_id  # from PBS_NODEFILE / PBS_JOBID
    assert sorted(r["host"] for r in json.loads((run / "check.json").read_text())["reports"]) == ["node1", "node2"]
    # qstat here has no -F json: the backend falls back to plain `qstat -f`.
    os.environ.update(slurm_cluster.env)
    info = PBSScheduler().status([job_id])[job_id]
    assert info.raw_state.startswith("C") or info.state == JobState.UNKNOWN
    proc = aegis(slurm_cluster, "submit", cfg, "--site-file", SITES / "testcluster-pbs.yaml", "--run-dir",
                 tmp_path / "r2", "--queue", "nosuch")
    assert proc.returncode == 1 and "invalid partition specified: nosuch" in proc.stderr
    errors = [line for line in proc.stderr.strip().splitlines() if not line.startswith("aegis: warning: ")]
    assert len(errors) == 1  # the warnings: the model's config.json is not on this machine


def pending_reason(sched, job_id, timeout=30):
    """The job's squeue reason once slurmctld has looked at it ("None" before its scheduling pass)."""
    deadline = time.monotonic() + timeout
    while True:
        info = sched.status([job_id])[job_id]
        if info.reason or info.state != JobState.PENDING or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


def test_job_after_another_is_pending_on_its_dependency_then_runs(slurm_cluster, tmp_path, sleeper):
    """sbatch(1), --dependency=afterany:job_id: "This job can begin execution after the specified jobs have
    terminated"; squeue(1) reason "Dependency" while it waits. B needs one node of three: only A holds it."""
    site = SITES / "testcluster.yaml"
    blocker = config(tmp_path, "a.yaml", instances=1, tensor_parallel_size=8, engine_python=str(sleeper),
                     startup_timeout=600)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    proc = aegis(slurm_cluster, "submit", blocker, "--site-file", site, "--run-dir", run_a, "--json")
    assert proc.returncode == 0, proc.stderr
    job_a = json.loads(proc.stdout)["job_id"]
    sched = SlurmScheduler()
    os.environ.update(slurm_cluster.env)
    deadline = time.monotonic() + 120
    while sched.status([job_a])[job_a].state != JobState.RUNNING:
        assert time.monotonic() < deadline, "A never ran"
        time.sleep(0.5)
    proc = aegis(slurm_cluster, "submit", config(tmp_path, "b.yaml", instances=1, tensor_parallel_size=8),
                 "--site-file", site, "--run-dir", run_b, "--check", "--after", run_a, "--json")
    assert proc.returncode == 0, proc.stderr
    job_b = json.loads(proc.stdout)["job_id"]
    assert f"#SBATCH --dependency=afterany:{job_a}\n" in (run_b / "job.sh").read_text()
    info = pending_reason(sched, job_b)
    assert (info.state, info.raw_state, info.reason) == (JobState.PENDING, "PENDING", "Dependency"), info
    shown = slurm_cluster.run("scontrol", "show", "job", job_b).stdout  # the controller's own record
    assert f"Dependency=afterany:{job_a}(unfulfilled)" in shown, shown
    status = json.loads(aegis(slurm_cluster, "status", run_b, "--json").stdout)
    assert (status["state"], status["reason"]) == ("pending", "Dependency")
    time.sleep(3)  # scheduling passes later (sched_interval=1) it still waits with free nodes
    assert sched.status([job_b])[job_b].state == JobState.PENDING
    assert aegis(slurm_cluster, "cancel", run_a).returncode == 0
    deadline = time.monotonic() + 180
    while not (info := sched.status([job_b])[job_b]).state.finished:
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
    assert info.state == JobState.COMPLETED, info
    assert json.loads((run_b / "check.json").read_text())["ok"] is True
    times = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", f"{job_a},{job_b}", "-o", "JobID,Start,End").stdout
    rows = {r.split("|")[0]: r.split("|")[1:] for r in times.split()}
    assert rows[job_a][1] <= rows[job_b][0], rows  # B started once A had ended (ISO times sort as text)


def test_begin_time_is_pending_until_then(slurm_cluster, tmp_path):
    """sbatch(1), --begin=YYYY-MM-DD[THH:MM[:SS]]: "Submit the batch script to the Slurm controller
    immediately, like normal, but tell the controller to defer the allocation of the job until the
    specified time"; squeue reason "BeginTime" until then."""
    run = tmp_path / "run"
    begin = (datetime.datetime.now() + datetime.timedelta(seconds=10)).replace(microsecond=0)
    proc = aegis(slurm_cluster, "submit", config(tmp_path, instances=1, tensor_parallel_size=8), "--site-file",
                 SITES / "testcluster.yaml", "--run-dir", run, "--check", "--begin", begin.isoformat(), "--json")
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    os.environ.update(slurm_cluster.env)
    sched = SlurmScheduler()
    info = pending_reason(sched, job_id)
    assert (info.state, info.reason) == (JobState.PENDING, "BeginTime"), info
    shown = slurm_cluster.run("scontrol", "show", "job", job_id).stdout
    assert f"EligibleTime={begin.isoformat()}" in shown, shown
    deadline = time.monotonic() + 120
    while not (info := sched.status([job_id])[job_id]).state.finished:
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
    assert info.state == JobState.COMPLETED, info
    start = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "Start").stdout.strip()
    assert datetime.datetime.fromisoformat(start) >= begin
