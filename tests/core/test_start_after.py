"""Job dependencies and begin times (`aegis submit --after/--after-ok/--begin`): the directives each backend
renders, checked against the syntax the schedulers document, and the refusals. The schedulers' own
behaviour is tested live: tests/sched/test_slurm_jobs.py, tests/sched/test_pbs_real.py.
"""
from __future__ import annotations

import datetime as dt
import re

import pytest

from aegis.errors import UsageError
from aegis.schedulers.deps import StartAfter, parse_begin
from aegis.schedulers.local import LocalScheduler
from aegis.schedulers.pbs import PBSScheduler
from aegis.schedulers.slurm import SlurmScheduler
from tests.core.helpers import run_cli

NOW = dt.datetime(2026, 12, 4, 16, 30, 5, 123456)
WHEN = dt.datetime(2027, 1, 2, 3, 4, 5)

# qsub.1B (OpenPBS doc/man1/qsub.1B, "Options to qsub"): -a [[[[CC]YY]MM]DD]hhmm[.SS]; -W depend=<type>:<arg
# list>[,<type>:<arg list> ...], <arg list> = <job ID>[:<job ID> ...], types after/afterok/afternotok/afterany.
PBS_A = re.compile(r"^(((((\d\d)?\d\d)?\d\d)?\d\d)?\d\d\d\d)(\.\d\d)?$")
PBS_DEPEND = re.compile(r"^(after|afterok|afternotok|afterany):[^:,]+(:[^:,]+)*(,(after|afterok|afternotok|afterany)"
                        r":[^:,]+(:[^:,]+)*)*$")
# sbatch(1) of Slurm 22.05 (this machine's): -b, --begin=<time>, "YYYY-MM-DD[THH:MM[:SS]]"; -d, --dependency=
# <dependency_list>, "<type:job_id[:job_id][,type:job_id[:job_id]]>" ("All dependencies must be satisfied if the
# "," separator is used").
SLURM_BEGIN = re.compile(r"^\d{4}-\d\d-\d\d(T\d\d:\d\d(:\d\d)?)?$")
SLURM_DEPEND = re.compile(r"^(after|afterany|afterok|afternotok)(:\d+(_\d+)?)+(,(after|afterany|afterok|afternotok)"
                          r"(:\d+(_\d+)?)+)*$")


def test_pbs_directives_follow_qsub_1b():
    start = StartAfter(after_any=("12.pbs01", "13.pbs01"), after_ok=("7",), begin=WHEN)
    out = PBSScheduler().start_directives(start)
    assert out == ["-W depend=afterany:12.pbs01:13.pbs01,afterok:7", "-a 202701020304.05"]
    assert PBS_DEPEND.match(out[0].removeprefix("-W depend="))
    assert PBS_A.match(out[1].removeprefix("-a "))
    # CCYYMMDDhhmm.SS read back as qsub's cvtdate reads it (src/lib/Libcmds/cvtdate.c, the 12-digit case).
    assert dt.datetime.strptime(out[1].removeprefix("-a "), "%Y%m%d%H%M.%S") == WHEN


def test_slurm_directives_follow_sbatch_1():
    start = StartAfter(after_any=("4242", "4243_7"), after_ok=("17",), begin=WHEN)
    out = SlurmScheduler().start_directives(start)
    assert out == ["--dependency=afterany:4242:4243_7,afterok:17", "--begin=2027-01-02T03:04:05"]
    assert SLURM_DEPEND.match(out[0].removeprefix("--dependency="))
    assert SLURM_BEGIN.match(out[1].removeprefix("--begin="))


def test_nothing_to_wait_for_renders_nothing():
    for sched in (PBSScheduler(), SlurmScheduler(), LocalScheduler()):
        assert sched.start_directives(StartAfter()) == []
    assert PBSScheduler().start_directives(StartAfter(after_ok=("5.s",))) == ["-W depend=afterok:5.s"]
    assert SlurmScheduler().start_directives(StartAfter(begin=WHEN)) == ["--begin=2027-01-02T03:04:05"]


@pytest.mark.parametrize("sched,bad", [
    (SlurmScheduler(), "12.pbshead"), (SlurmScheduler(), "4242;rm"), (SlurmScheduler(), ""),
    (PBSScheduler(), "12.pbs head"), (PBSScheduler(), "afterok:12"), (PBSScheduler(), "$(id)"),
])
def test_a_job_id_the_scheduler_could_not_have_given_is_refused(sched, bad):
    with pytest.raises(UsageError, match=f"not a {sched.name} job id"):
        sched.start_directives(StartAfter(after_any=(bad,)))


def test_the_local_scheduler_cannot_hold_a_job():
    with pytest.raises(UsageError, match="cannot hold it"):
        LocalScheduler().start_directives(StartAfter(begin=WHEN))


@pytest.mark.parametrize("text,when", [
    ("2027-01-02T03:04", dt.datetime(2027, 1, 2, 3, 4)),
    ("2027-01-02 03:04:05", WHEN),
    ("now+01:00:00", dt.datetime(2026, 12, 4, 17, 30, 5)),   # whole seconds: the schedulers take no less
    ("now+1-00:00:10", dt.datetime(2026, 12, 5, 16, 30, 15)),
])
def test_begin_times(text, when):
    assert parse_begin(text, now=NOW) == when


def test_begin_with_an_offset_becomes_local_time():
    aware = dt.datetime(2027, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert parse_begin(aware.isoformat(), now=NOW) == aware.astimezone().replace(tzinfo=None)


@pytest.mark.parametrize("text", ["tomorrow", "2027-01-02", "now+1h", "now+", "12:00", "2027-13-01T00:00"])
def test_bad_begin_is_one_clear_error(text):
    with pytest.raises(UsageError, match=r"--begin .*: not a time; give YYYY-MM-DDTHH:MM\[:SS\]"):
        parse_begin(text, now=NOW)


def test_submit_dry_run_renders_them_and_after_takes_a_run_directory(tmp_path, capsys):
    run = tmp_path / "earlier"
    run.mkdir()
    (run / "job_id").write_text("4242.polaris-pbs-01\n")
    code, out, err = run_cli(capsys, "submit", "--site", "polaris", "--model", "org/m", "--account", "a",
                             "--dry-run", "--after", run, "--after-ok", "17", "--begin", "2027-01-02T03:04:05")
    assert code == 0, err
    assert "#PBS -W depend=afterany:4242.polaris-pbs-01,afterok:17\n#PBS -a 202701020304.05\n" in out
    code, out, err = run_cli(capsys, "submit", "--site", "polaris", "--model", "org/m", "--account", "a",
                             "--dry-run", "--after", tmp_path)
    assert code == 2 and err.strip() == f"aegis: error: {tmp_path} is not a submitted run directory (it has no " \
                                        "job_id file)"
