"""`aegis probe` and `aegis smoke` against simulated servers."""
import json

import pytest

from tests.bench.conftest import aegis


@pytest.mark.slow
def test_probe_table_statuses_and_files(make_sim, tmp_path):
    s = make_sim("--max-num-seqs", "1", "--decode-ms", "10")
    out = tmp_path / "probe"
    p = aegis("probe", "--url", s.url, "--rates", "4,40", "--duration", "1.5", "--arrival", "constant",
              "--input-len", "16", "--output-len", "6", "--timeout", "0.8", "--no-progress", "--output-dir", str(out))
    lines = p.stdout.splitlines()
    assert lines[0].split("|")[0].strip() == "Rate" and "Success%" in lines[0] and "Status" in lines[0]
    rows = [json.loads(x) for x in (out / "probe.jsonl").read_text().splitlines()]
    assert [r["rate"] for r in rows] == [4.0, 40.0]
    assert rows[0]["status"] == "OK" and rows[0]["success_pct"] == 100.0
    assert rows[1]["status"] == "TOO HIGH" and rows[1]["errors_by_kind"].get("timeout", 0) > 0
    assert "Highest OK rate: 4 req/s" in p.stdout
    assert (out / "probe.csv").read_text().startswith("rate,status,success_pct")
    assert (out / "rate-4" / "requests.jsonl").exists() and (out / "rate-40" / "summary.json").exists()
    assert json.loads((out / "probe.json").read_text())["highest_ok_rate"] == 4.0


def test_smoke_checks_every_endpoint_and_adapter(make_sim, tmp_path):
    s = make_sim("--lora-modules", "ad1,ad2", "--decode-ms", "1")
    ep = {"job_id": "1", "run_dir": str(tmp_path), "api_key_file": None, "instances": [
        {"name": "i0", "model": "sim-model", "url": s.url, "status": "ready", "lora_adapters": ["ad1", "ad2"]},
        {"name": "i1", "model": "sim-model", "url": "http://127.0.0.1:9", "status": "starting"}]}
    (tmp_path / "endpoints.json").write_text(json.dumps(ep))
    p = aegis("smoke", "--endpoints", str(tmp_path), "--json")
    rows = json.loads(p.stdout)
    assert {(r["endpoint"], r["model"], r["status"]) for r in rows} == {
        ("i0", "sim-model", "OK"), ("i0", "ad1", "OK"), ("i0", "ad2", "OK"), ("i1", "sim-model", "SKIPPED")}
    assert all(r["output_tokens"] == 8 for r in rows if r["status"] == "OK")
    p = aegis("smoke", "--url", s.url, "--expect", "^ ba")
    assert "OK" in p.stdout
    p = aegis("smoke", "--url", s.url, "--expect", "never-there", check=False)
    assert p.returncode == 1 and "does not match" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_smoke_fails_in_one_line_for_a_dead_server():
    p = aegis("smoke", "--url", "http://127.0.0.1:9", "--model", "m", check=False)
    assert p.returncode == 1
    assert "smoke: 1 of 1 checks failed" in p.stderr and "connect" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_smoke_bad_regex_is_a_usage_error():
    p = aegis("smoke", "--url", "http://127.0.0.1:9", "--expect", "(", check=False)
    assert p.returncode == 2 and "--expect" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_progress_bar_follows_the_results_file(tmp_path):
    import io
    import time

    from aegis.bench.progress import Progress
    f = tmp_path / "requests.jsonl"
    f.write_text('{"success":true}\n{"success":false}\n{"succ')
    buf = io.StringIO()
    pr = Progress(str(f), expected=4, duration=None, t0=time.perf_counter(), stream=buf)
    pr.poll()
    assert (pr.done, pr.errors) == (2, 1)
    with open(f, "a") as fh:
        fh.write('ess":true}\n')
    pr.poll()
    assert (pr.done, pr.errors) == (3, 1)
    line = pr.line()
    assert "75.0%" in line and "3/4 req" in line and "errors 1" in line
