"""The run directory's protocol: RunDir's file names, the typed records and their versions, the state rules."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from aegis.config.schema import resolve
from aegis.config.sites import load_site
from aegis.errors import AegisError, UsageError
from aegis.launch.endpoints import EndpointsFile, InstanceEndpoint, InstanceState, RunState
from aegis.launch.head import next_state, overall_state
from aegis.launch.health import Probe
from aegis.launch.node_status import NodeStatus, RankState, RankStatus
from aegis.plan.placement import Plan, PlanFileError, make_plan
from aegis.run import Run, default_run_dir
from aegis.rundir import RunDir, find_run_dir

S = InstanceState


def test_rundir_owns_distinct_names_inside_the_directory(tmp_path):
    run = RunDir(tmp_path)
    paths = [getattr(run, name) for name, attr in vars(RunDir).items() if isinstance(attr, property)
             and name not in ("job_id",)]
    paths += [run.node_status(3), run.node_check(3), run.log("i0")]
    assert all(p.parent in (run.path, run.nodes, run.logs) for p in paths)
    assert len({p for p in paths}) == len(paths), "two properties name the same file"


def test_rundir_expands_user_and_find_run_dir_uses_aegis_runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert RunDir(Path("~/r")).path == tmp_path / "r"
    runs = tmp_path / "elsewhere"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "job_id").write_text("42\n")
    monkeypatch.setenv("AEGIS_RUNS_DIR", str(runs))
    assert find_run_dir(None).path == runs / "a"
    assert find_run_dir("~/elsewhere/a").job_id == "42"
    monkeypatch.setenv("AEGIS_RUNS_DIR", str(tmp_path / "none"))
    with pytest.raises(UsageError, match="none under"):
        find_run_dir(None)


def test_default_run_dir_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = resolve({"model": "m/x", "runs_dir": "~/aegis-runs"})
    assert default_run_dir(cfg).parent == tmp_path / "aegis-runs"


def _endpoints(tmp_path) -> EndpointsFile:
    return EndpointsFile(job_id="7", run_dir=str(tmp_path), site="local", state=RunState.DEGRADED, instances=[
        InstanceEndpoint(name="a-0", model="a", url="http://h:8000", host="h", port=8000, status=S.READY),
        InstanceEndpoint(name="a-1", model="a", url="http://h:8001", host="h", port=8001, status=S.RESTARTING)])


def test_endpoints_file_round_trip_is_private_and_typed(tmp_path):
    doc = _endpoints(tmp_path)
    doc.write(RunDir(tmp_path).endpoints)
    assert stat.S_IMODE(os.stat(tmp_path / "endpoints.json").st_mode) == 0o600
    back = EndpointsFile.read(tmp_path)
    assert back.state is RunState.DEGRADED and back.instances[1].status is S.RESTARTING
    assert back.url_view() == {"a": ["http://h:8000"]}
    assert not back.all_ready and back.updated > 0
    raw = json.loads((tmp_path / "endpoints.json").read_text())
    assert raw["version"] == 1 and raw["instances"][0]["status"] == "ready"  # the documented strings


def test_newer_or_broken_endpoints_file_is_one_clear_line(tmp_path):
    path = RunDir(tmp_path).endpoints
    path.write_text(json.dumps({"version": 99, "instances": []}))
    with pytest.raises(AegisError, match="version 99 is newer than this aegis understands .*upgrade aegis"):
        EndpointsFile.read(tmp_path)
    assert RunDir(tmp_path).read_endpoints() is None
    proc = subprocess.run([sys.executable, "-m", "aegis", "endpoints", str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "upgrade aegis" in proc.stderr
    path.write_text(json.dumps({"instances": [{"name": "x", "url": "http://h:1", "model": "m", "status": "bogus"}]}))
    with pytest.raises(AegisError, match=r"invalid endpoints file at instances\.0\.status"):
        EndpointsFile.read(path)


def test_node_status_round_trip_and_unknown_version(tmp_path):
    path = RunDir(tmp_path).node_status(0)
    path.parent.mkdir()
    NodeStatus(index=0, host="n0", agent_pid=1, updated=1.0, ranks={
        "i0": RankStatus(instance="i0", rank=0, state=RankState.RUNNING, pid=5)}).write(path)
    back = NodeStatus.read(path)
    assert back is not None and back.ranks["i0"].state is RankState.RUNNING
    path.write_text(json.dumps({"version": 2, "index": 0}))
    assert NodeStatus.read(path) is None


def test_plan_round_trips_through_plan_json(tmp_path):
    site = load_site("aurora").resolved()
    plan = make_plan(site, resolve({"model": "m/x", "instances": 5, "tensor_parallel_size": 2}), nodes=1)
    path = RunDir(tmp_path).plan
    path.write_text(plan.to_json())
    back = Plan.read(path)
    assert back.to_dict() == plan.to_dict()
    assert [i.head.devices for i in back.instances] == [i.head.devices for i in plan.instances]
    path.write_text(json.dumps({**plan.to_dict(), "version": 3}))
    with pytest.raises(PlanFileError, match="plan version 3; this aegis reads versions 1 and 2"):
        Plan.read(path)
    # Version 1 (every instance explicit, no blocks) is still read.
    v1 = {**plan.expanded().to_dict(), "version": 1}
    del v1["blocks"]
    path.write_text(json.dumps(v1))
    assert Plan.read(path).instances == back.instances


def _inst(status, pid=10, log="L"):
    return InstanceEndpoint(name="i", model="m", url="http://h:1", status=status, pid=pid, log=log)


def _rank(state, pid=10, rank=0, restarts=0):
    return RankStatus(instance="i", rank=rank, state=state, pid=pid, restarts=restarts, exit_code=1, log="L",
                      log_tail="boom\nlast words")


OK, DOWN = Probe(True), Probe(False, "refused")


@pytest.mark.parametrize("status, ranks, probe, age, expect", [
    (S.STARTING, [_rank(RankState.STARTING)], None, 1, S.STARTING),
    (S.STARTING, [_rank(RankState.RUNNING)], OK, 1, S.READY),
    (S.STARTING, [_rank(RankState.RUNNING)], DOWN, 99, S.FAILED),        # startup_timeout passed
    (S.READY, [_rank(RankState.RUNNING)], DOWN, 1, S.UNHEALTHY),
    (S.READY, [_rank(RankState.RUNNING)], None, 99, S.READY),            # not probed this round
    (S.UNHEALTHY, [_rank(RankState.RUNNING)], OK, 1, S.READY),
    (S.READY, [_rank(RankState.RESTARTING)], None, 1, S.RESTARTING),
    (S.READY, [_rank(RankState.RUNNING, pid=11)], OK, 1, S.RESTARTING),  # replaced by a new process
    (S.READY, [_rank(RankState.RUNNING), _rank(RankState.RUNNING, pid=None, rank=1)], OK, 1, S.RESTARTING),
    (S.RESTARTING, [_rank(RankState.FAILED)], OK, 1, S.FAILED),
    (S.FAILED, [_rank(RankState.RUNNING)], OK, 1, S.FAILED),              # failed stays failed
])
def test_instance_state_rules(status, ranks, probe, age, expect):
    state, error = next_state(_inst(status), ranks, probe, since=0.0, now=float(age), startup_timeout=30)
    assert state is expect
    if expect is S.FAILED and status is not S.FAILED and ranks[0].state is RankState.FAILED:
        assert error == "exited 1 after 0 restart(s); log: L; last line: last words"


def test_loaded_reported_after_ready_is_bounded_by_ready(tmp_path):
    """The agent's "loaded" report can reach the head after the probe passed: loaded <= ready, in order."""
    from aegis.launch.allocation import Allocation
    from aegis.launch.head import Head

    site = load_site("h200").resolved()
    cfg = resolve({"model": "m/x", "instances": 1})
    head = Head(RunDir(tmp_path), site, cfg, make_plan(site, cfg, nodes=1), Allocation("slurm", "1", ["n1"]),
                echo=lambda m: None)
    head._prepare()
    inst = head.instances[0]
    head.doc.started = t0 = 1000.0
    rank = _rank(RankState.RUNNING)
    rank.instance, rank.first_started_at = inst.name, t0 + 2
    head.since[inst.name] = 0.0
    head._update(inst, [rank], OK)  # ready (at wall-clock time now), loaded not reported yet
    assert inst.status is S.READY and list(inst.phases) == ["started", "ready"]
    rank.loaded_at = t0 + inst.phases["ready"] + 3  # seen by the agent 3 s after the probe passed
    assert head._update(inst, [rank], None)
    assert list(inst.phases) == ["started", "loaded", "ready"]
    assert inst.phases["loaded"] == inst.phases["ready"]


def test_run_state_rules():
    assert overall_state([S.READY, S.READY], RunState.STARTING) is RunState.READY
    assert overall_state([S.FAILED, S.FAILED], RunState.READY) is RunState.FAILED
    assert overall_state([S.FAILED, S.READY], RunState.STARTING) is RunState.DEGRADED
    assert overall_state([S.FAILED, S.STARTING], RunState.STARTING) is RunState.STARTING
    assert overall_state([S.RESTARTING, S.READY], RunState.READY) is RunState.DEGRADED


def test_run_handle_reads_the_directory_and_requests_shutdown(tmp_path):
    _endpoints(tmp_path).write(RunDir(tmp_path).endpoints)
    run = Run(tmp_path)
    assert run.endpoints().instances[0].name == "a-0"
    run.shutdown(timeout=0)
    assert RunDir(tmp_path).shutdown.exists()
    assert not run.head_alive()
    with pytest.raises(UsageError, match="has no job id"):
        run.cancel()


def test_hand_written_endpoints_file_is_read_by_the_same_reader(tmp_path):
    """A file for servers aegis did not start: url or host+port, no status (serving), no name."""
    from aegis.bench.endpoints import load_endpoints

    (tmp_path / "key").write_text("k\n")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"api_key_file": "key", "instances": [
        {"host": "10.0.0.1", "port": 8000, "model": "m", "devices": [0, 1]},
        {"url": "http://10.0.0.2:8000/v1/", "lora_adapters": [{"name": "sql"}]}]}))
    doc = EndpointsFile.read(path)
    assert [i.name for i in doc.instances] == ["instance-0", "instance-1"]
    assert doc.instances[0].url == "http://10.0.0.1:8000" and doc.instances[0].devices == ["0", "1"]
    assert doc.all_ready and doc.api_key_file == str(tmp_path / "key")
    fleet = load_endpoints(path)
    assert [e.url for e in fleet.endpoints] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert fleet.endpoints[1].model is None and fleet.endpoints[1].lora_adapters == ["sql"]


def test_runs_started_in_the_same_second_get_their_own_directory(tmp_path):
    """Issue 17: two `aegis launch` in the same second with the same name shared one run directory
    (plan and key overwritten). claim() creates it atomically, adding -2, -3, ... when taken."""
    import stat
    from concurrent.futures import ThreadPoolExecutor

    from aegis.rundir import claim

    base = tmp_path / "runs" / "20260101-000000-job"
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: claim(base), range(16)))
    assert len(set(got)) == 16 and base in got and base.with_name(base.name + "-16") in got
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in got)  # private to its user


def test_an_agent_silent_for_four_heartbeats_is_lost(tmp_path):
    """Issue 17: the head marks the instances of an agent that stopped reporting failed, saying why; a fresh
    report (an agent writes one at least every heartbeat_interval) keeps them as they are."""
    import time

    from aegis.launch.allocation import Allocation
    from aegis.launch.head import Head

    site = load_site("h200").resolved()
    cfg = resolve({"model": "m/x", "instances": 1, "heartbeat_interval": 5})
    run = RunDir(tmp_path)
    head = Head(run, site, cfg, make_plan(site, cfg, nodes=1), Allocation("slurm", "1", ["n1"]),
                echo=lambda m: None)
    head._prepare()
    inst = head.instances[0]
    run.nodes.mkdir(exist_ok=True)
    for age, expect in ((5, S.READY), (25, S.FAILED)):
        rank = RankStatus(instance=inst.name, rank=0, state=RankState.RUNNING, pid=10, log="L")
        NodeStatus(index=0, host="n1", agent_pid=77, updated=time.time() - age,
                   ranks={inst.name: rank}).write(run.node_status(0))
        inst.status, inst.pid = S.READY, 10
        head._update(inst, head._agent_ranks().get(inst.name, []), None)
        assert inst.status is expect, (age, inst.error)
    assert inst.error.startswith("its agent on n1 (pid 77) sent no report for 25 s: node or agent lost")


def test_a_finished_job_leaves_no_stale_ready(tmp_path):
    """Issue 17: a job that ended without its head writing so (killed, its node lost), seen from the login node:
    `aegis status` writes the run and its live instances failed, with the job's end."""
    from aegis.schedulers.base import JobInfo, JobState
    from aegis.schedulers.jobs import describe

    run = RunDir(tmp_path)
    _endpoints(tmp_path).write(run.endpoints)
    describe(JobInfo(job_id="7", state=JobState.RUNNING), run, "local")
    assert EndpointsFile.read(tmp_path).state is RunState.DEGRADED  # running: nothing to repair
    lines = describe(JobInfo(job_id="7", state=JobState.TIMEOUT), run, "local")
    doc = EndpointsFile.read(tmp_path)
    assert doc.state is RunState.FAILED and {i.status for i in doc.instances} == {S.FAILED}
    assert doc.instances[0].error == "the job ended (timeout) without its head stopping the run"
    assert any("a-0" in line and "failed" in line for line in lines)
