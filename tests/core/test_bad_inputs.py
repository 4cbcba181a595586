"""Bad command-line inputs (issue 17's list): each is one line naming the problem, exit 2, no traceback.

Table-driven: each row is the input a user (or a hostile neighbour) gave and the words the one line must
contain. The first group printed tracebacks, hung or were accepted before.
"""
from __future__ import annotations

import pytest

from tests.core.helpers import run_cli


def files(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "list.json").write_text("[1, 2]\n")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "nan.txt").write_text("nan\n1\n")
    (tmp_path / "inf.jsonl").write_text('{"timestamp": Infinity}\n')
    (tmp_path / "neg.txt").write_text("-5\n1\n")
    (tmp_path / "empty.txt").write_text("# nothing\n")


SUBMIT_AT = ["submit", "--model", "m", "--account", "a", "--dry-run", "--site"]
BENCH = ["bench", "--url", "http://127.0.0.1:9", "--model", "m"]
CASES = [
    (["plan", "{d}/binary.yaml"], "not a text file"),
    (["submit", "{d}/binary.yaml", "--dry-run"], "not a text file"),
    (["health", "{d}/list.json"], "not an endpoints file"),
    (["health", "{d}/binary.json"], "not an endpoints file"),
    (["bench", "--url", "http://[::1", "--model", "m", "--num-requests", "1"], "invalid endpoint URL"),
    (["bench", "--url", "http://127.0.0.1:99999", "--model", "m", "--num-requests", "1"], "invalid endpoint URL"),
    (BENCH + ["--rate", "1e9", "--num-requests", "1"], "--rate"),
    (BENCH + ["--rate", "1e5", "--duration", "1e5"], "plans 1e+10 requests"),
    (BENCH + ["--rate", "10", "--num-requests", "2000000000"], "--num-requests"),
    (BENCH + ["--rate", "0", "--num-requests", "1"], "--rate"),
    (BENCH + ["--rate", "nan", "--num-requests", "1"], "--rate"),
    (BENCH + ["--concurrency", "1", "--num-requests", "1", "--scrape-interval", "0"], "--scrape-interval"),
    (BENCH + ["--concurrency", "0", "--num-requests", "1"], "--concurrency"),
    (BENCH + ["--arrival", "trace", "--trace", "{d}/nan.txt"], "finite number"),
    (BENCH + ["--arrival", "trace", "--trace", "{d}/inf.jsonl"], "finite number"),
    (BENCH + ["--arrival", "trace", "--trace", "{d}/neg.txt"], "finite number"),
    (BENCH + ["--arrival", "trace", "--trace", "{d}/empty.txt"], "holds no timestamps"),
    (["plan", "--model", "m", "--nodes", "100000000000000000000000"], "--nodes"),
    (["plan", "--model", "m", "--nodes", "1e23"], "--nodes"),
    (["plan", "--model", "m", "--instances", "-1"], "instances"),
    (["plan", "--model", "m", "--tp", "0"], "--tensor-parallel-size"),
    (["plan", "--model", "m", "--walltime", "1h"], "walltime"),
    (["plan", "--site", "nowhere", "--model", "m"], "no site named"),
    (SUBMIT_AT + ["frontier", "--after", "12.pbshead"], "'12.pbshead': not a slurm job id"),
    (SUBMIT_AT + ["polaris", "--after-ok", "1;reboot"], "'1;reboot': not a pbs job id"),
    (SUBMIT_AT + ["frontier", "--after", "{d}/no-such-run"], "no-such-run: no such run directory"),
    (SUBMIT_AT + ["frontier", "--begin", "tomorrow"], "--begin 'tomorrow': not a time"),
    (["submit", "--site", "local", "--model", "m", "--dry-run", "--after", "1"], "cannot hold it"),
]


@pytest.mark.parametrize("argv,words", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
    files(tmp_path)
    code, out, err = run_cli(capsys, *[a.format(d=tmp_path) for a in argv])
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and words in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 or lines[-1].startswith("Error: "), err  # ours, or click's usage error
