"""The PBS backend against outputs recorded from a real OpenPBS server (tests/pbs/recorded/, OpenPBS commit
cd7ab5edaf03, 23.06.06; tests/pbs/record.sh made them on the complex of tests/pbs/). The older fixtures in
tests/core/fixtures/pbs/ were written from the PBS reference guide; these are what the server says.

The status() paths run the real backend code against a stand-in `qstat`/`qdel` on PATH that replays the
recorded stdout, stderr and exit status of the real command for the same arguments.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aegis.config.sites import load_site
from aegis.errors import UsageError
from aegis.schedulers import pbs
from aegis.schedulers.base import JobState
from tests.fixtures.pbs import queue_limits

REC = Path(__file__).parents[1] / "pbs" / "recorded"
IDS = dict(item.split("=") for item in (REC / "job-ids.txt").read_text().split())
DEPS = dict(item.split("=") for item in (REC / "job-ids-deps.txt").read_text().split())  # record-deps.sh


def job(name: str):
    (info,) = pbs.parse_qstat_json((REC / f"qstat-f-json-{name}.json").read_text()).values()
    return info


@pytest.mark.parametrize("name,state,exit_code", [
    ("ok", JobState.COMPLETED, "0"),
    ("failed", JobState.FAILED, "3"),
    ("running", JobState.RUNNING, None),
    ("walltime", JobState.TIMEOUT, "-29"),          # substate 93, "exceeded resource walltime"
    ("deleted", JobState.CANCELLED, "143"),          # qdel while running: substate 91, "terminated by"
    ("stubborn-deleted", JobState.CANCELLED, "271"),
    ("multinode-deleted", JobState.CANCELLED, "271"),
    ("held-deleted", JobState.CANCELLED, None),      # never ran: no Exit_status at all
    ("never-runs-deleted", JobState.CANCELLED, None),
    ("held", JobState.PENDING, None),
    ("never-runs", JobState.PENDING, None),
    # record-deps.sh: qsub -W depend=... / -a (qsub.1B)
    ("dependency-held", JobState.PENDING, None),    # H / 22, Hold_Types s, no comment
    ("after-deleted-unrun", JobState.PENDING, None),  # its afterany job was deleted unrun: held still
    ("begin-waiting", JobState.PENDING, None),      # W / 30, Execution_Time
    ("dependency-ran", JobState.COMPLETED, "0"),    # released when its job ended, then ran
    ("afterok-of-failed", JobState.CANCELLED, None),  # deleted by the server: F / 92, no Exit_status
    ("after-unknown", JobState.CANCELLED, None),    # afterany of an id the server does not know: the same
])
def test_states_as_the_real_server_reports_them(name, state, exit_code):
    info = job(name)
    assert (info.state, info.exit_code) == (state, exit_code), info
    if name == "running":
        assert info.nodes == "pbsnode1,pbsnode2"
    if name == "never-runs":
        assert "Can Never Run" in info.reason


def test_why_a_job_waits_or_never_ran_in_slurms_words():
    """The server gives no comment for these (recorded); the reason names the cause as Slurm's squeue does
    (Dependency, BeginTime) with the attribute that says more."""
    assert job("dependency-held").reason == f"Dependency (afterany:{DEPS['parent']}@pbshead)"
    assert job("after-deleted-unrun").reason == f"Dependency (afterany:{DEPS['unrun']}@pbshead)"
    raw = json.loads((REC / "qstat-f-json-begin-waiting.json").read_text())
    when = next(iter(raw["Jobs"].values()))["Execution_Time"]
    assert job("begin-waiting").reason == f"BeginTime ({when})"
    assert job("afterok-of-failed").reason == ("deleted by the server: its dependency cannot be met "
                                               f"(afterok:{DEPS['failing']}@pbshead)")
    # What the server logged for it (server-log-deps.txt): the state says nothing more than F / 92.
    log = (REC / "server-log-deps.txt").read_text()
    assert f"{DEPS['afterok_failed']};Job deleted as result of dependency on job {DEPS['failing']}" in log
    assert f"{DEPS['after_unknown']}@pbshead;Dependency request for job rejected by 99999.pbshead" in log
    assert job("dependency-ran").reason.endswith("and finished")  # the server's comment again
    for name in ("dependency-held", "begin-waiting"):
        (plain,) = pbs.parse_qstat_full((REC / f"qstat-f-{name}.txt").read_text()).values()
        assert (plain.state, plain.reason) == (job(name).state, job(name).reason), name
    (plain,) = pbs.parse_qstat_full((REC / "qstat-fx-afterok-of-failed.txt").read_text()).values()
    assert (plain.state, plain.reason) == (job("afterok-of-failed").state, job("afterok-of-failed").reason)


def test_job_ids_the_server_gave_are_the_ones_after_accepts():
    """Every recorded id (qsub's stdout) passes the backend's check; what real qsub refuses as a `depend`
    id (recorded: "qsub: illegal -W value", exit 2) it refuses before submitting."""
    sched = pbs.PBSScheduler()
    for job_id in [*IDS.values(), *DEPS.values(), IDS["ok"].split(".")[0]]:
        assert sched.check_job_id(job_id) == job_id
    assert (REC / "qsub-bad-depend.txt.rc").read_text().strip() == "2"
    assert "qsub: illegal -W value" in (REC / "qsub-bad-depend.txt.stderr").read_text()
    with pytest.raises(UsageError, match="'notajob': not a pbs job id"):
        sched.check_job_id("notajob")


def test_plain_qstat_f_agrees_with_json_and_keeps_wrapped_words_whole():
    for name in ("deleted", "failed", "walltime", "never-runs-deleted"):
        (plain,) = pbs.parse_qstat_full((REC / f"qstat-fx-{name}.txt").read_text()).values()
        assert (plain.state, plain.exit_code) == (job(name).state, job(name).exit_code), name
    (deleted,) = pbs.parse_qstat_full((REC / "qstat-fx-deleted.txt").read_text()).values()
    assert deleted.reason.endswith("and terminated by root@pbshead")  # wrapped inside "terminated"
    (walltime,) = pbs.parse_qstat_full((REC / "qstat-fx-walltime.txt").read_text()).values()
    assert walltime.reason.endswith("and exceeded resource walltime")  # wrapped before a space: kept


@pytest.fixture
def replay(tmp_path, monkeypatch):
    """qstat/qdel on PATH that print a recorded output (chosen by the test) with its exit status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for tool in ("qstat", "qdel"):
        script = bin_dir / tool
        script.write_text(f"""#!/bin/sh
echo "{tool} $*" >> {calls}
key=$(echo "{tool} $*" | tr ' ' '_')
f=$(grep -F "$key=" {tmp_path}/map | head -1 | cut -d= -f2)
[ -n "$f" ] || {{ echo "no recording for {tool} $*" >&2; exit 99; }}
case "$f" in /*) ;; *) f="{REC}/$f" ;; esac
cat "$f"
[ -f "$f.stderr" ] && cat "$f.stderr" >&2
exit $(cat "$f.rc" 2>/dev/null || echo 0)
""")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def play(mapping: dict[str, str]) -> Path:
        (tmp_path / "map").write_text("".join(f"{' '.join(k.split()).replace(' ', '_')}={v}\n"
                                              for k, v in mapping.items()))
        return calls
    return play


def test_several_jobs_although_openpbs_prints_only_the_first_in_json(replay, tmp_path):
    """openpbs/openpbs#2672: `qstat -f -F json -x A B C` prints only A (recorded: qstat-f-json-several.json);
    the others are asked again in plain text."""
    ids = [IDS["ok"], IDS["failed"], IDS["running"], IDS["walltime"]]
    assert len(json.loads((REC / "qstat-f-json-several.json").read_text())["Jobs"]) == 1
    # Plain `qstat -f -x` of several jobs prints their blocks one after another: the recorded blocks.
    rest = tmp_path / "rest.txt"
    rest.write_text("\n".join((REC / f).read_text() for f in ("qstat-fx-failed.txt", "qstat-f-running.txt",
                                                               "qstat-fx-walltime.txt")))
    calls = replay({f"qstat -f -F json -x {' '.join(ids)}": "qstat-f-json-several.json",
                    f"qstat -f -x {' '.join(ids[1:])}": str(rest)})
    got = pbs.PBSScheduler().status(ids)
    assert [got[i].state for i in ids] == [JobState.COMPLETED, JobState.FAILED, JobState.RUNNING,
                                           JobState.TIMEOUT], (got, calls.read_text())
    assert len(calls.read_text().splitlines()) == 2  # one JSON query, one plain query for the three left out


def test_a_known_and_an_unknown_job_together(replay):
    """Recorded: exit 153 ("Unknown Job Id 99999.pbshead") with the known job's JSON on stdout."""
    replay({f"qstat -f -F json -x {IDS['ok']} 99999": "qstat-f-json-known-and-unknown.json"})
    got = pbs.PBSScheduler().status([IDS["ok"], "99999"])
    assert got[IDS["ok"]].state == JobState.COMPLETED and got["99999"].state == JobState.UNKNOWN


def test_cancelling_a_finished_job_is_not_an_error(replay):
    """Recorded: qdel of a finished job exits 35, "qdel: Job has finished"."""
    calls = replay({f"qdel {IDS['ok']}": "qdel-finished.txt"})
    pbs.PBSScheduler().cancel(IDS["ok"])
    assert calls.read_text().strip() == f"qdel {IDS['ok']}"


def test_testpbs_queue_table_is_the_recorded_servers():
    """tests/sched/sites/testpbs.yaml's queue table states the limits the complex's server enforces, as it
    listed them (record-queues.sh: qstat-Qf-json.json); test_pbs_real.py checks the live server too."""
    site = load_site("testpbs", [REC.parents[1] / "sched" / "sites" / "testpbs.yaml"])
    table = {row.name: (row.min_nodes, row.max_nodes, row.max_walltime) for row in site.queues}
    assert queue_limits((REC / "qstat-Qf-json.json").read_text()) == table
