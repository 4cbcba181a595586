"""`aegis bench` end to end against simulated servers: outputs, truth, errors, fleets, kill and resume."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from aegis.bench.runner import client_limits
from tests.bench.conftest import REPO, aegis, records, reset, segments, truth

FAST = ("--input-len", "32", "--output-len", "8", "--no-progress")


@pytest.mark.slow
def test_bench_outputs_match_the_servers_truth(make_sim, tmp_path):
    key = tmp_path / "key"
    key.write_text("very-secret-key-123\n")
    os.chmod(key, 0o600)
    s = make_sim("--decode-ms", "4", "--api-key-file", str(key))
    out = tmp_path / "run"
    p = aegis("bench", "--url", s.url, "--rate", "40", "--num-requests", "80", *FAST, "--slo", "ttft=2000",
              "--output-dir", str(out), env={"AEGIS_API_KEY": "very-secret-key-123"})
    assert "Serving Benchmark Result" in p.stdout and "Successful requests:" in p.stdout
    for name in ("requests.jsonl", "summary.json", "prometheus.csv", "config.json", "workload.jsonl"):
        assert (out / name).exists(), name
        assert "very-secret-key-123" not in (out / name).read_text()
    assert "very-secret-key-123" not in p.stdout + p.stderr
    recs = records(out)
    assert sorted(r["index"] for r in recs) == list(range(80))
    assert all(r["success"] and r["output_tokens"] == 8 and r["prompt_tokens"] == 32 for r in recs)
    summ = json.loads((out / "summary.json").read_text())
    assert summ["completed"] == 80 and summ["request_goodput"] == pytest.approx(summ["request_throughput"])
    assert summ["input_lengths_exact"] is True
    assert summ["prometheus"]["total"]["generation_tokens_delta"] == 640
    # client timestamps against the server's (one monotonic clock on this machine)
    t0 = segments(out)[0]["t0_monotonic"]
    tr = truth(s.url)
    # The baseline scrape is in before the first request is sent (a baseline taken after would miss the first
    # requests' tokens: a real vLLM e2e run once counted 17 of 24), and the first request reaches the server
    # after it.
    first_row = next(line for line in (out / "prometheus.csv").read_text().splitlines()[1:] if ",ALL," in line)
    assert float(first_row.split(",")[0]) < 0
    assert min(t["received"] for t in tr.values()) > t0 + float(first_row.split(",")[0])
    ttft_err, itl_err = [], []
    for r in recs:
        t = tr[r["request_id"]]
        sent = t0 + r["sent_s"]
        first = sent + r["ttft_ms"] / 1e3
        # causality (times are rounded to the microsecond in the JSONL)
        assert sent <= t["arrival"] + 2e-6 and first >= t["first_token"] - 2e-6
        ttft_err.append(r["ttft_ms"] - (t["first_token"] - t["arrival"]) * 1e3)
        itl_err += list(np.array(r["itl_ms"]) - np.diff(t["token_times"]) * 1e3)
    assert abs(np.median(ttft_err)) < 3.0, np.median(ttft_err)
    assert abs(np.median(itl_err)) < 1.0
    # intended send times follow the Poisson schedule, and were kept
    lags = [r["dispatch_lag_ms"] for r in recs]
    assert np.median(lags) < 3.0


@pytest.mark.slow
def test_ttft_tracks_the_truth_under_queueing(make_sim, tmp_path):
    s = make_sim("--max-num-seqs", "4", "--decode-ms", "5")
    out = tmp_path / "run"
    aegis("bench", "--url", s.url, "--rate", "150", "--num-requests", "100", *FAST, "--output-dir", str(out))
    t0 = segments(out)[0]["t0_monotonic"]
    tr = truth(s.url)
    client, server = [], []
    for r in records(out):
        t = tr[r["request_id"]]
        client.append(r["ttft_ms"])
        server.append((t["first_token"] - t["arrival"]) * 1e3)
        assert t0 + r["sent_s"] <= t["arrival"] + 2e-6
    client, server = np.array(client), np.array(server)
    assert np.median(server) > 50                     # the queue really built up
    assert np.median(np.abs(client - server)) < 5.0


@pytest.mark.slow
def test_errors_and_timeouts_are_counted_by_kind(make_sim, tmp_path):
    s = make_sim("--fail-every", "4", "--disconnect-every", "5", "--decode-ms", "2")
    out = tmp_path / "run"
    aegis("bench", "--url", s.url, "--rate", "50", "--num-requests", "40", *FAST, "--output-dir", str(out))
    summ = json.loads((out / "summary.json").read_text())
    assert summ["errors_by_kind"] == {"http_500": 10, "disconnect": 6}
    assert summ["completed"] == 24 and len(records(out)) == 40
    slow = make_sim("--decode-ms", "200")
    out2 = tmp_path / "slow"
    aegis("bench", "--url", slow.url, "--rate", "20", "--num-requests", "4", *FAST, "--timeout", "0.3",
          "--output-dir", str(out2))
    assert json.loads((out2 / "summary.json").read_text())["errors_by_kind"] == {"timeout": 4}


@pytest.mark.slow
def test_endpoints_file_fleet_lora_and_routing(make_sim, tmp_path):
    a = make_sim("--lora-modules", "la,lb", "--max-loras", "1", "--lora-swap-ms", "1", "--decode-ms", "2")
    b = make_sim("--lora-modules", "la,lb", "--max-loras", "1", "--lora-swap-ms", "1", "--decode-ms", "2")
    key = tmp_path / "key"
    key.write_text("k\n")
    os.chmod(key, 0o600)
    ep = {"job_id": "7", "run_dir": str(tmp_path), "api_key_file": str(key), "instances": [
        {"name": "sim-0", "model": "sim-model", "url": a.url, "status": "ready", "lora_adapters": ["la", "lb"]},
        {"name": "sim-1", "model": "sim-model", "url": b.url, "status": "ready", "lora_adapters": ["la", "lb"]},
        {"name": "sim-2", "model": "sim-model", "url": "http://127.0.0.1:9", "status": "starting"}]}
    (tmp_path / "endpoints.json").write_text(json.dumps(ep))
    out = tmp_path / "rr"
    aegis("bench", "--endpoints", str(tmp_path), "--rate", "60", "--num-requests", "40", *FAST,
          "--lora", "auto", "--lora-mix", "round-robin", "--scrape-interval", "0.2", "--output-dir", str(out))
    summ = json.loads((out / "summary.json").read_text())
    assert {k: v["completed"] for k, v in summ["per_endpoint"].items()} == {"sim-0": 20, "sim-1": 20}
    assert {k: v["completed"] for k, v in summ["per_adapter"].items()} == {"la": 20, "lb": 20}
    assert {r["model"] for r in records(out)} == {"la", "lb"}
    csv = (out / "prometheus.csv").read_text()
    assert ",sim-0," in csv and ",sim-1," in csv and ",ALL," in csv
    out2 = tmp_path / "lor"
    aegis("bench", "--endpoints", str(tmp_path / "endpoints.json"), "--concurrency", "4", "--num-requests", "24",
          *FAST, "--routing", "least-outstanding", "--output-dir", str(out2))
    counts = json.loads((out2 / "summary.json").read_text())["per_endpoint"]
    assert set(counts) == {"sim-0", "sim-1"} and all(v["completed"] >= 6 for v in counts.values())


@pytest.mark.slow
def test_closed_loop_keeps_concurrency_and_several_workers_share_the_load(make_sim, tmp_path):
    s = make_sim("--decode-ms", "3")
    out = tmp_path / "closed"
    aegis("bench", "--url", s.url, "--concurrency", "3", "--num-requests", "30", *FAST, "--workers", "2",
          "--workload", "shared-prefix", "--num-groups", "2", "--prompts-per-group", "3", "--prefix-len", "32",
          "--suffix-len", "8", "--output-dir", str(out))
    recs = records(out)
    assert len(recs) == 30 and {r["worker"] for r in recs} == {0, 1}
    summ = json.loads((out / "summary.json").read_text())
    assert summ["max_concurrent_requests"] <= 3 and summ["num_workers"] == 2
    assert set(summ["per_group"]) == {"0", "1"}
    events = sorted([(t["arrival"], 1) for t in truth(s.url).values()] +
                    [(t["finish"], -1) for t in truth(s.url).values()])
    assert max(np.cumsum([d for _, d in events])) <= 3
    assert summ["prometheus"]["total"]["prefix_cache_hit_rate"] > 0.3


@pytest.mark.slow
def test_kill_leaves_finished_requests_and_resume_completes(make_sim, tmp_path):
    s = make_sim("--decode-ms", "2")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("AEGIS_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "aegis", "bench", "--url", s.url, "--rate", "25",
                             "--num-requests", "75", *FAST, "--output-dir", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (out / "requests.jsonl").exists() and len(records(out)) >= 10:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    n_killed = len(records(out))
    time.sleep(0.5)
    assert len(records(out)) == n_killed            # the workers died with the bench
    assert 10 <= n_killed < 75
    p = aegis("bench", "--resume", "--output-dir", str(out), "--url", s.url, "--no-progress")
    recs = records(out)
    assert sorted(r["index"] for r in recs) == list(range(75))
    assert {r["segment"] for r in recs} == {0, 1}
    summ = json.loads((out / "summary.json").read_text())
    assert summ["completed"] == 75 and summ["status"] == "complete"
    assert "Successful requests:" in p.stdout


def test_sigint_writes_an_interrupted_summary(make_sim, tmp_path):
    s = make_sim("--decode-ms", "2")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "aegis", "bench", "--url", s.url, "--rate", "20",
                             "--num-requests", "200", *FAST, "--output-dir", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ((out / "requests.jsonl").exists() and len(records(out)) >= 5):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    summ = json.loads((out / "summary.json").read_text())
    assert summ["status"] == "interrupted" and 5 <= summ["completed"] < 200


def test_client_limits_tell_cpu_bound_from_starved():
    lagged, kept = {"dispatch_lag_ms": {"p99": 7.5}}, {"dispatch_lag_ms": {"p99": 0.5}}
    assert client_limits(lagged, []) == (["dispatch lag p99 7.5 ms > 5 ms"], [])
    assert client_limits(kept, [{"worker": 0, "saturated": False}]) == ([], [])
    hot = {"worker": 1, "saturated": True, "saturated_windows": 3, "windows": 4, "starved": False}
    assert "worker 1 saturated" in client_limits(kept, [hot])[0][0]
    # lag while the worker used 3% CPU and waited for one 20% of the time: starved, not CPU-bound
    cold = {"worker": 0, "saturated": False, "starved": True, "cpu_wait_mean": 0.2, "cpu_util_mean": 0.03,
            "loop_lag_p99_ms": 148.0}
    bound, starved = client_limits(lagged, [cold])
    assert bound == [] and starved[0] == "dispatch lag p99 7.5 ms > 5 ms"
    assert "waited for a CPU 20% of the time while using 3%" in starved[1]
    assert client_limits(kept, [cold]) == ([], [])                    # the schedule was kept: nothing to say
    assert client_limits(lagged, [cold, hot])[1] == []                # a saturated worker: CPU-bound


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores: one for the server")
def test_a_client_sharing_its_core_with_a_hog_is_starved_not_cpu_bound(make_sim, tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    client_core, server_core = cores[0], cores[1]
    s = make_sim("--decode-ms", "2")
    os.sched_setaffinity(s.proc.pid, {server_core})
    pin = lambda: os.sched_setaffinity(0, {client_core})  # noqa: E731
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("AEGIS_API_KEY", None)

    def pinned_and_niced():   # niced (as a batch job's helper would be): it waits longer behind the hogs
        pin()
        os.nice(10)
    bench = subprocess.Popen([sys.executable, "-m", "aegis", "bench", "--url", s.url, "--rate", "20",
                              "--num-requests", "60", *FAST, "--workers", "1", "--output-dir", str(out)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=pinned_and_niced)
    deadline = time.monotonic() + 60
    while not (out / "requests.jsonl").exists() and time.monotonic() < deadline:   # the worker is up
        time.sleep(0.02)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pin) for _ in range(2)]
    try:
        stdout, stderr = bench.communicate(timeout=120)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert bench.returncode == 0, stderr
    summ = json.loads((out / "summary.json").read_text())
    w = summ["workers"][0]
    assert summ["dispatch_lag_ms"]["p99"] > 5, summ["dispatch_lag_ms"]      # the schedule slipped ...
    assert w["cpu_util_mean"] < 0.5 and w["cpu_wait_mean"] > 0.05            # ... with the CPU held by the hogs
    assert summ["client_starved"] and not summ["client_bound"], (summ["client_bound_reasons"], w)
    assert "CLIENT-STARVED" in stdout and "CLIENT-BOUND" not in stdout


@pytest.mark.parametrize("args,msg", [
    ((), "--endpoints RUN_DIR or --url"),
    (("--url", "http://127.0.0.1:9", "--model", "m", "--rate", "1", "--num-requests", "1", "--slo", "ttft"), "--slo"),
    (("--resume",), "--resume needs --output-dir"),
    (("--url", "http://127.0.0.1:9", "--model", "m", "--num-requests", "3"), "--rate"),
])
def test_usage_errors_are_one_line(args, msg):
    p = aegis("bench", *args, check=False)
    assert p.returncode == 2, p.stderr
    assert msg in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_unreachable_server_is_one_line(tmp_path):
    p = aegis("bench", "--url", "http://127.0.0.1:9", "--rate", "1", "--num-requests", "1", check=False)
    assert p.returncode == 1 and "cannot reach" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_existing_run_dir_is_refused(sim, tmp_path):
    reset(sim.url)
    out = tmp_path / "run"
    aegis("bench", "--url", sim.url, "--rate", "50", "--num-requests", "3", *FAST, "--output-dir", str(out))
    p = aegis("bench", "--url", sim.url, "--rate", "50", "--num-requests", "3", *FAST, "--output-dir", str(out),
              check=False)
    assert p.returncode == 2 and "--resume" in p.stderr


def test_chat_sharegpt_without_streaming_and_a_trace(sim, tmp_path):
    reset(sim.url)
    data = [{"conversations": [{"from": "human", "value": f"question number {i} about things"},
                               {"from": "gpt", "value": " ".join(["word"] * (3 + i))}]} for i in range(5)]
    (tmp_path / "sg.json").write_text(json.dumps(data))
    (tmp_path / "trace.txt").write_text("\n".join(str(100 + 0.02 * i) for i in range(5)))
    out = tmp_path / "run"
    aegis("bench", "--url", sim.url, "--api", "chat", "--no-stream", "--workload", "sharegpt", "--dataset",
          str(tmp_path / "sg.json"), "--arrival", "trace", "--trace", str(tmp_path / "trace.txt"), "--no-progress",
          "--output-dir", str(out))
    recs = sorted(records(out), key=lambda r: r["index"])
    assert len(recs) == 5 and all(r["success"] for r in recs)
    assert [r["intended_s"] for r in recs] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08], abs=1e-6)
    # output lengths come from the dataset's answers (the simulator's tokenizer: one token per word)
    assert sorted(r["output_tokens"] for r in recs) == sorted(r["target_output_tokens"] for r in recs)
    assert all(r["ttft_ms"] == r["e2el_ms"] for r in recs)      # no stream: the first token is the answer


def test_rate_with_a_concurrency_cap(make_sim, tmp_path):
    s = make_sim("--decode-ms", "20")
    out = tmp_path / "cap"
    aegis("bench", "--url", s.url, "--rate", "100", "--arrival", "constant", "--concurrency", "2",
          "--num-requests", "12", *FAST, "--output-dir", str(out))
    recs = records(out)
    summ = json.loads((out / "summary.json").read_text())
    assert summ["max_concurrent_requests"] <= 2 and summ["completed"] == 12
    # each request takes ~9 decode steps of 20 ms: the cap, not the client, delays the later sends
    assert max(r["queue_wait_ms"] for r in recs) > 100
    assert summ["dispatch_lag_ms"]["median"] < 5


def test_the_offered_rate_is_the_asked_rate(sim, tmp_path):
    reset(sim.url)
    out = tmp_path / "run"
    p = aegis("bench", "--url", sim.url, "--rate", "25", "--num-requests", "40", *FAST, "--output-dir", str(out))
    sent = sorted(r["sent_s"] for r in records(out))
    intended = sorted(r["intended_s"] for r in records(out))
    assert 39 / (intended[-1] - intended[0]) == pytest.approx(25, rel=1e-4)   # the schedule (rounded to 1 us)
    assert 39 / (sent[-1] - sent[0]) == pytest.approx(25, rel=0.03)           # what the server was offered
    summ = json.loads((out / "summary.json").read_text())
    assert summ["request_rate"] == 25 and summ["offered_rate"] == pytest.approx(39 / (sent[-1] - sent[0]))
    assert "Offered rate (req/s):" in p.stdout and "(asked 25)" in p.stdout
