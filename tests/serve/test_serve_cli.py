"""`aegis serve`'s inputs and its record (fast): the end time, bad input as one line, the status view."""
from __future__ import annotations

import datetime as dt
import time

import pytest

from aegis.errors import UsageError
from aegis.serve.chain import Chain, ChainJob, Handover, JobRole, ServiceDir
from aegis.serve.cli import parse_until, status_lines
from tests.core.helpers import run_cli


def test_until_and_duration():
    now = 1_800_000_000.0
    assert parse_until(None, "40h", now) == now + 40 * 3600
    assert parse_until(None, "90m", now) == now + 5400
    assert parse_until(None, "01:30:00", now) == now + 5400
    later = dt.datetime.fromtimestamp(now) + dt.timedelta(hours=3)
    assert parse_until(later.strftime("%Y-%m-%d %H:%M"), None, now) == pytest.approx(
        later.replace(second=0, microsecond=0).timestamp())
    for until, duration, words in ((None, None, "how long"), ("2026-01-01 00:00", "1h", "how long"),
                                   (None, "soon", "--duration"), ("2020-01-01 10:00", None, "in the past"),
                                   ("tomorrow", None, "not a time")):
        with pytest.raises(UsageError, match=words):
            parse_until(until, duration, now)


def test_node_hours_and_the_status_view(tmp_path):
    t = time.time() - 3600
    chain = Chain(until=t + 7200, jobs=[
        ChainJob(index=1, run_dir="a", job_id="11", role=JobRole.ENDED, submitted=t, started=t + 60, ready=t + 90,
                 ended=t + 1860, nodes=2, end_reason="handed over", tokens=9000),
        ChainJob(index=2, run_dir="b", job_id="12", role=JobRole.SERVING, submitted=t + 1500, started=t + 1560,
                 ready=t + 1600, nodes=2, why="successor of job 1")],
        handovers=[Handover(old=1, new=2, at=t + 1600, old_ended=t + 1860, overlap_node_hours=2 * 300 / 3600)])
    assert chain.jobs[0].node_hours == pytest.approx(2 * 1800 / 3600)  # nodes x (end - start)
    assert chain.overlap_node_hours == pytest.approx(1 / 6)
    assert chain.tokens_per_node_hour() == pytest.approx(9000 / 1.0)  # job 2's tokens are not counted yet
    ServiceDir(tmp_path).write(chain)
    back = ServiceDir(tmp_path).read()
    text = "\n".join(status_lines(back))
    assert "handover 1 -> 2" in text and "0.167 node-hours" in text and "successor of job 1" in text
    assert "9,000 generated tokens per node-hour" in text


def test_bad_serve_input_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("site: local-sim\nmodel: m\nengine: sim\n")
    for argv, words in ((["serve", str(tmp_path / "c.yaml")], "how long"),
                        (["serve", str(tmp_path / "c.yaml"), "--duration", "x"], "--duration"),
                        (["serve", "--status", str(tmp_path)], "not a service directory"),
                        (["serve", "--status"], "service directory")):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and words in err and "Traceback" not in err, (argv, err)
    (tmp_path / "g.yaml").write_text("site: local-sim\nmodel: m\nengine: sim\ngateway: true\n")
    code, _, err = run_cli(capsys, "serve", str(tmp_path / "g.yaml"), "--duration", "1h")
    assert code == 2 and "remove gateway: true" in err


def test_size_budget_from_a_service_and_from_a_per_instance_rate(tmp_path, capsys):
    t = time.time() - 7200
    ServiceDir(tmp_path).write(Chain(until=t, jobs=[ChainJob(index=1, run_dir="a", started=t, ended=t + 3600,
                                                             nodes=2, tokens=1_000_000)]))
    # 1e6 tokens in 2 node-hours: 5e5 per node-hour; 4e6 tokens need 8 node-hours.
    code, out, err = run_cli(capsys, "size", "--tokens", "4e6", "--budget", "10", "--throughput", str(tmp_path))
    assert code == 0 and "need 8 node-hours" in out and "fits in 10 node-hours" in out, (out, err)
    code, out, _ = run_cli(capsys, "size", "--tokens", "4e6", "--budget", "7", "--throughput",
                           str(tmp_path / "service.json"))
    assert code == 0 and "does NOT fit" in out
    # 100 tok/s per TP-2 instance on an 8-device node (4 per node): 3.6e6 tokens are 10 instance-hours = 2.5
    # node-hours.
    code, out, err = run_cli(capsys, "size", "--tokens", "3.6e6", "--budget", "3", "--throughput", "100", "--tp", "2",
                             "--site", "h200", "--json")
    import json
    doc = json.loads(out)
    assert code == 0 and doc["node_hours_needed"] == pytest.approx(10 / 4) and doc["fits"], err
    code, _, err = run_cli(capsys, "size", "--tokens", "1e6", "--budget", "3")
    assert code == 2 and "--budget needs --tokens and --throughput" in err
