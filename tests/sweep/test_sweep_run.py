"""`aegis sweep` run modes end to end on the local site.

- Failure reasons, resume and --retry-failed with a stand-in engine (a GPU out-of-memory cannot happen on
  this machine: the stand-in prints the message PyTorch prints for one and exits, like a real vLLM would).
- The shipped 4-configuration example with the real CPU vLLM: interrupted half-way, resumed without
  re-running finished points, and the report's CSV checked against the per-request records.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.vllm import run_processes

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sweeps" / "local-tiny-4.yaml"
# What PyTorch prints when a GPU runs out of memory while vLLM loads (recorded from a real run).
OOM_LINE = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
            "capacity of 79.19 GiB of which 1.06 GiB is free.")


def aegis(*args, cwd=None, timeout=900, env=None):
    return subprocess.run([sys.executable, "-m", "aegis", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def statuses(sweep_dir: Path) -> dict[str, dict]:
    out = {}
    for f in sweep_dir.glob("*/status.json"):
        out[f.parent.name] = json.loads(f.read_text())
    return out


@pytest.fixture
def failing_spec(tmp_path):
    engine = tmp_path / "standin-python"
    engine.write_text("#!/bin/bash\n"
                      f"[ \"$STANDIN_FAILURE\" = oom ] && echo {OOM_LINE!r} >&2\n"
                      "echo \"engine could not start ($STANDIN_FAILURE)\" >&2\n"
                      "exit 1\n")
    engine.chmod(0o755)
    spec = tmp_path / "fail.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "fail", "site": "local",
        "base": {"model": "org/m", "engine_python": str(engine), "max_restarts": 0, "startup_timeout": 120},
        "axes": {"env.STANDIN_FAILURE": ["oom", "crash"]},
        "bench": {"rate": 1, "num_requests": 2}, "slo": {"min_success_pct": 99}}))
    return spec


@pytest.mark.slow
def test_failed_points_keep_their_reason_and_are_not_rerun(failing_spec, tmp_path):
    d = tmp_path / "sweep"
    r = aegis("sweep", failing_spec, "--dir", d, cwd=tmp_path, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "2 of 2 configuration(s) failed" in r.stderr
    st = statuses(d)
    oom, crash = by_label(st, "sfoom"), by_label(st, "sfcrash")
    assert oom["state"] == crash["state"] == "failed"
    assert oom["reason"].startswith("out of memory (log: ") and "not healthy" in oom["reason"]
    assert "engine could not start (crash)" in crash["reason"] and "out of memory" not in crash["reason"]
    assert not any(run_processes(d / name) for name in st)
    # The report names each failure; no half-written files.
    md = (d / "report" / "report.md").read_text()
    assert "out of memory" in md and "engine could not start (crash)" in md
    # A plain re-run is refused (results exist); --resume skips finished points, even failed ones.
    again = aegis("sweep", failing_spec, "--dir", d, cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr and "\n" not in again.stderr.strip()
    before = {n: (d / n / "status.json").stat().st_mtime_ns for n in st}
    resumed = aegis("sweep", failing_spec, "--dir", d, "--resume", cwd=tmp_path)
    assert resumed.returncode == 3 and resumed.stderr.count("failed earlier; skipped") == 2
    assert "starting the servers" not in resumed.stderr
    assert before == {n: (d / n / "status.json").stat().st_mtime_ns for n in st}
    # --retry-failed runs them again; the first attempt is kept under attempts/1.
    retried = aegis("sweep", failing_spec, "--dir", d, "--retry-failed", "--no-report", cwd=tmp_path, timeout=300)
    assert retried.returncode == 3 and retried.stderr.count("starting the servers") == 2
    for name in st:
        first = json.loads((d / name / "attempts" / "1" / "status.json").read_text())
        assert first["state"] == "failed" and first["started"] == st[name]["started"]


def by_label(st: dict, label: str) -> dict:
    return next(v for v in st.values() if v["label"] == label)


def test_inline_mode_outside_an_allocation_is_refused(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"site": "h200", "base": {"model": "org/m", "tensor_parallel_size": 8},
                                    "axes": {"max_num_seqs": [8, 16]}, "bench": {"rate": 1, "num_requests": 1}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))}
    r = aegis("sweep", spec, "--mode", "inline", "--dir", tmp_path / "d", cwd=tmp_path, env=env)
    assert r.returncode == 2 and "salloc" in r.stderr and "--mode jobs" in r.stderr
    assert not list((tmp_path / "d").glob("*/status.json"))


@pytest.mark.slow
def test_resume_refuses_a_changed_workload(failing_spec, tmp_path):
    d = tmp_path / "sweep"
    assert aegis("sweep", failing_spec, "--dir", d, "--no-report", cwd=tmp_path, timeout=300).returncode == 3
    spec = yaml.safe_load(failing_spec.read_text())
    spec["bench"]["num_requests"] = 3
    failing_spec.write_text(yaml.safe_dump(spec))
    r = aegis("sweep", failing_spec, "--dir", d, "--resume", cwd=tmp_path)
    assert r.returncode == 2 and "different workload" in r.stderr


# --------------------------------------------------------------------------- the real CPU vLLM


def _example_spec(tmp_path, vllm_env) -> Path:
    """The shipped example, pointed at this machine's CPU vLLM if it lives elsewhere than the example says."""
    data = yaml.safe_load(EXAMPLE.read_text())
    base = data["base"]
    if Path(os.path.expanduser(base["model"])) == vllm_env.model_dir and \
            Path(os.path.expanduser(base["engine_python"])) == vllm_env.python:
        return EXAMPLE
    base["model"], base["engine_python"] = str(vllm_env.model_dir), str(vllm_env.python)
    spec = tmp_path / "local-tiny-4.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec


def _wait_for(cond, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc is None or proc.poll() is None, f"sweep exited early while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_local_sweep_interrupted_resumed_and_reported(tmp_path, vllm_env):
    spec = _example_spec(tmp_path, vllm_env)
    d = tmp_path / "sweep"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "aegis", "sweep", str(spec), "--dir", str(d)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        def two_done_third_running():
            st = statuses(d).values()
            return sum(s["state"] == "done" for s in st) == 2 and any(s["state"] == "running" for s in st)
        _wait_for(two_done_third_running, 900, "two finished points", proc)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(300) == 130, (tmp_path / "first.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    first = (tmp_path / "first.log").read_text()
    assert "--resume" in first
    st = statuses(d)
    done = sorted(n for n, s in st.items() if s["state"] == "done")
    (interrupted,) = [n for n, s in st.items() if s["state"] == "interrupted"]
    assert len(done) == 2 and len(st) == 3 and st[interrupted]["reason"] == "stopped by signal SIGINT"
    _wait_for(lambda: not run_processes(d / interrupted), 60, "the interrupted point's servers to stop")
    kept = {n: {f: (d / n / f).stat().st_mtime_ns for f in ("status.json", "bench/requests.jsonl")} for n in done}

    r = aegis("sweep", spec, "--dir", d, "--resume", cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    for n in done:
        assert f"({n.rsplit('-', 1)[1]}): done earlier; skipped" in r.stderr
        assert kept[n] == {f: (d / n / f).stat().st_mtime_ns for f in kept[n]}  # never re-run
    assert r.stderr.count("starting the servers") == 2
    st = statuses(d)
    assert len(st) == 4 and all(s["state"] == "done" for s in st.values())
    assert json.loads((d / interrupted / "attempts" / "1" / "status.json").read_text())["state"] == "interrupted"
    for s in st.values():
        assert s["prefix_cache_reset"] == [{"before": "bench", "result": "reset"}]  # VLLM_SERVER_DEV_MODE=1
        assert set(s["steps"]) == {"warmup", "bench"} and all(x["exit_code"] == 0 for x in s["steps"].values())
    assert not any(run_processes(d / n) for n in st)

    # The report: one bench run per configuration, values equal to what the per-request records give.
    rep = d / "report"
    with open(rep / "results_long.csv", newline="") as fh:
        long = {(row["config_hash"], row["metric"]): float(row["value"]) for row in csv.DictReader(fh)}
    with open(rep / "summary.csv", newline="") as fh:
        wide = list(csv.DictReader(fh))
    assert sorted(r["config_hash"] for r in wide) == sorted(s["hash"] for s in st.values())
    assert all(r["kind"] == "bench" for r in wide)  # warm-ups and attempts are not results
    for name, s in st.items():
        records = [json.loads(line) for line in (d / name / "bench" / "requests.jsonl").read_text().splitlines()]
        ok = [x for x in records if x["success"]]
        assert long[(s["hash"], "completed")] == len(ok) == 16
        assert long[(s["hash"], "mean_ttft_ms")] == pytest.approx(statistics.mean(x["ttft_ms"] for x in ok))
        assert long[(s["hash"], "median_e2el_ms")] == pytest.approx(statistics.median(x["e2el_ms"] for x in ok))
        assert long[(s["hash"], "success_pct")] == 100.0
    md = (rep / "report.md").read_text()
    assert "Best:" in md and all(s["label"] in md for s in st.values())
    import matplotlib.image

    for png in ("throughput_vs_latency.png", "pareto.png", "prometheus.png"):
        img = matplotlib.image.imread(rep / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
