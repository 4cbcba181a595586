"""Scheduler backends: state translation, output parsers (PBS fixtures), batching, backoff, local jobs."""
import json
import time
from pathlib import Path

import pytest

from aegis.config.sites import load_site
from aegis.errors import SchedulerError
from aegis.launch.allocation import discover, expand_hostlist, node_index
from aegis.rundir import RunDir
from aegis.schedulers import pbs, slurm
from aegis.schedulers.base import JobInfo, JobState, Poller, run_command
from aegis.schedulers.jobs import EXIT_JOB_FAILED, JobEnded, wait_for_run
from aegis.schedulers.local import LocalScheduler
from tests.core.helpers import run_cli

FIX = Path(__file__).parent / "fixtures" / "pbs"
JID = "812345.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"


@pytest.mark.parametrize("name,state,exit_code", [
    ("queued", JobState.PENDING, None), ("running", JobState.RUNNING, None),
    ("finished_ok", JobState.COMPLETED, "0"), ("finished_failed", JobState.FAILED, "1"),
    ("deleted", JobState.CANCELLED, "271"), ("walltime", JobState.TIMEOUT, "-29"),
])
def test_pbs_json_states(name, state, exit_code):
    info = pbs.parse_qstat_json((FIX / f"{name}.json").read_text())[JID]
    assert info.state == state and info.exit_code == exit_code
    if name == "running":
        assert info.nodes == "x4102c5s2b0n0,x4102c5s3b0n0"
    if name == "queued":
        assert "Insufficient amount of resource" in info.reason


def test_pbs_json_batch_and_empty():
    two = pbs.parse_qstat_json((FIX / "two_jobs.json").read_text())
    assert {k.split(".")[0]: v.state for k, v in two.items()} == {"812345": JobState.RUNNING,
                                                                  "812346": JobState.PENDING}
    assert pbs.parse_qstat_json((FIX / "no_jobs.json").read_text()) == {}


def test_pbs_plain_qstat_f_matches_json():
    plain = pbs.parse_qstat_full((FIX / "running_full.txt").read_text())[JID]
    as_json = pbs.parse_qstat_json((FIX / "running.json").read_text())[JID]
    assert (plain.state, plain.nodes, plain.reason) == (as_json.state, as_json.nodes, as_json.reason)


@pytest.mark.parametrize("raw,state", [
    ("PENDING", JobState.PENDING), ("RUNNING", JobState.RUNNING), ("COMPLETING", JobState.COMPLETING),
    ("COMPLETED", JobState.COMPLETED), ("FAILED", JobState.FAILED), ("NODE_FAIL", JobState.FAILED),
    ("OUT_OF_MEMORY", JobState.FAILED), ("CANCELLED by 0", JobState.CANCELLED), ("TIMEOUT", JobState.TIMEOUT),
    ("REQUEUED", JobState.PENDING), ("WEIRD", JobState.UNKNOWN),
])
def test_slurm_states(raw, state):
    assert slurm.normalise_state(raw) == state


def test_slurm_parsers():
    sq = slurm.parse_squeue("41|RUNNING|None|node[1-3]\n42|PENDING|Resources|\n")
    assert sq["41"].state == JobState.RUNNING and sq["41"].nodes == "node[1-3]"
    assert sq["42"].reason == "Resources" and sq["42"].nodes == ""
    sa = slurm.parse_sacct("41|COMPLETED|0:0|node[1-3]\n41.batch|COMPLETED|0:0|node1\n"
                           "43|CANCELLED by 0|0:15|node2\n")
    assert set(sa) == {"41", "43"} and sa["43"].state == JobState.CANCELLED


def test_run_command_errors(tmp_path):
    with pytest.raises(SchedulerError, match="not found"):
        run_command([str(tmp_path / "no-such-sbatch")])
    with pytest.raises(SchedulerError, match="did not answer within 1 s"):
        run_command(["sleep", "5"], timeout=1, what="squeue")
    with pytest.raises(SchedulerError, match="sbatch failed: boom"):
        run_command(["sh", "-c", "echo boom >&2; exit 1"], what="sbatch")


class Script:
    """A scheduler whose states come from a list (to test polling, not a scheduler)."""

    def __init__(self, states):
        self.states = list(states)
        self.calls = []

    def status(self, job_ids, run_dirs=None):
        self.calls.append(list(job_ids))
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {j: JobInfo(job_id=j, state=state) for j in job_ids}


def test_poller_batches_and_backs_off():
    sched = Script([JobState.PENDING] * 4 + [JobState.RUNNING])
    poller = Poller(sched, first=1, factor=2, longest=5, sleep=lambda s: None)
    intervals = []
    for _ in range(6):
        poller.poll(["1", "2"])
        intervals.append(poller.interval)
    assert sched.calls == [["1", "2"]] * 6  # one call per round for all jobs
    assert intervals == [1, 2, 4, 5, 1, 2]  # backs off while nothing changes, resets on a change


def _settle(sched, job, run_dir, timeout=20):
    """Poll (not waitpid: subprocess may already have reaped it) until the job has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = sched.status([job], {job: str(run_dir)})[job]
        if info.state != JobState.RUNNING and (Path(run_dir) / "exit_code").exists():
            return info
        time.sleep(0.05)
    raise AssertionError(f"{job} did not end")


def test_local_job_status_and_cancel(tmp_path):
    sched = LocalScheduler()
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsleep 60\n")
    job = sched.submit(str(script), str(tmp_path))
    assert sched.status([job], {job: str(tmp_path)})[job].state == JobState.RUNNING
    sched.cancel(job)  # straight after submit: the exit status must still be recorded
    assert _settle(sched, job, tmp_path).state == JobState.CANCELLED
    done = tmp_path / "done"
    done.mkdir()
    (done / "job.sh").write_text("exit 3\n")
    job2 = sched.submit(str(done / "job.sh"), str(done))
    info = _settle(sched, job2, done)
    assert info.state == JobState.FAILED and info.exit_code == "3"


def test_wait_reports_failure_with_log(tmp_path):
    (tmp_path / "job_id").write_text("99\n")
    (tmp_path / "slurm-99.out").write_text("boom\n")
    sched = Script([JobState.RUNNING, JobState.FAILED])
    poller = Poller(sched, first=0.01, sleep=lambda s: None)
    run = RunDir(tmp_path)
    import aegis.schedulers.jobs as jobs
    orig = jobs.get_scheduler
    jobs.get_scheduler = lambda name: sched
    try:
        with pytest.raises(JobEnded) as info:
            wait_for_run(run, load_site("h200"), timeout=10, echo=lambda *a, **k: None, poller=poller)
    finally:
        jobs.get_scheduler = orig
    assert info.value.exit_code == EXIT_JOB_FAILED
    assert f"log: {tmp_path / 'slurm-99.out'}" in str(info.value) and "failed" in str(info.value)


def test_status_and_cancel_commands_on_a_local_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "submit", "--site", "local", "--model", "m", "--check", "--wait",
                             "--timeout", "60")
    assert code == 0, err
    run = next(Path("runs").iterdir())
    assert json.loads((run / "nodes" / "0.json").read_text())["index"] == 0
    code, out, err = run_cli(capsys, "status", "--json")  # the newest run under ./runs
    doc = json.loads(out)
    assert code == 0 and doc["state"] == "completed" and doc["run_dir"] == str(run.absolute())
    code, out, err = run_cli(capsys, "cancel", str(run))
    assert code == 1 and "is not running" in err
    code, out, err = run_cli(capsys, "status", str(tmp_path / "nope" / "x"))
    assert code == 2 and "no such run directory" in err


def test_discover_slurm_pbs_and_local(tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x4102c5s2b0n0\nx4102c5s2b0n0\nx4102c5s3b0n0\n")  # one line per rank
    alloc = discover({"PBS_NODEFILE": str(nodefile), "PBS_JOBID": "812345.aurora-pbs"})
    assert alloc.scheduler == "pbs" and alloc.hosts == ["x4102c5s2b0n0", "x4102c5s3b0n0"]
    assert discover({}).scheduler == "local"
    assert expand_hostlist("node[1-3,07],gpu01,x[09-11]y") == [
        "node1", "node2", "node3", "node07", "gpu01", "x09y", "x10y", "x11y"]
    assert node_index(["a", "b", "c"], {"SLURM_NODEID": "2"}) == 2
