"""`aegis serve` on the real 3-node Slurm cluster with simulated engines: a chain of 2-minute jobs behind one
gateway (issue 16). Handovers under steady load lose no request; a successor held in the queue leaves its
predecessor serving until the walltime, and the user is told; a cancelled job is replaced."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.gateway import call
from tests.sched.test_slurm_jobs import SITES, config

pytestmark = pytest.mark.slow
SITE = SITES / "testcluster-sim.yaml"
WALLTIME = 120  # the shortest walltime Slurm takes is a minute; two give a handover room


class ServeProc:
    """`aegis serve` as a user runs it (in the foreground of a terminal: here, a subprocess)."""

    def __init__(self, cluster, tmp: Path, cfg: Path, duration: int, lead: int):
        self.sdir = tmp / "svc"
        self.log = tmp / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aegis", "serve", str(cfg), "--site-file", str(SITE), "--duration", f"{duration}s",
             "--lead", str(lead), "--gateway-host", "127.0.0.1", "--gateway-port", "0", "--service-dir",
             str(self.sdir)], stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **cluster.env},
            start_new_session=True)

    def chain(self) -> dict:
        try:
            return json.loads((self.sdir / "service.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chain = self.chain()
            if chain and predicate(chain):
                return chain
            assert self.proc.poll() is None or predicate(self.chain()), self.log.read_text()[-3000:]
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}: {self.log.read_text()[-3000:]}")

    @property
    def key(self) -> str:
        return (self.sdir / "gateway.key").read_text().strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(180)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def sim_config(tmp_path: Path) -> Path:
    # --exclusive: a job holds its node, so a successor needs another free node (and a blocker can hold them).
    return config(tmp_path, model="sim-chain", engine="sim", instances=2, walltime="00:02:00",
                  extra_args=["--decode-ms", "2", "--startup-seconds", "1"], directives=["--exclusive"],
                  startup_timeout=120, shutdown_grace=20)


def roles(chain: dict) -> list[str]:
    return [j["role"] for j in chain.get("jobs", [])]


def test_three_handovers_under_steady_load_lose_nothing(slurm_cluster, tmp_path):
    serve = ServeProc(slurm_cluster, tmp_path, sim_config(tmp_path), duration=215, lead=75)
    try:
        chain = serve.wait(lambda c: "serving" in roles(c) and c.get("gateway"), 120, "job 1 serving")
        url = chain["gateway"]
        assert call(url + "/v1/models", None)[0] == 401
        bench = subprocess.run(
            [sys.executable, "-m", "aegis", "bench", "--url", url, "--api-key-file", str(serve.sdir / "gateway.key"),
             "--model", "sim-chain", "--rate", "8", "--duration", "170", "--arrival", "constant", "--output-len", "8",
             "--input-len", "32", "--no-progress", "--output-dir", str(tmp_path / "bench"), "--json"],
            capture_output=True, text=True, timeout=400)
        assert bench.returncode == 0, bench.stderr[-2000:]
        chain = serve.wait(lambda c: c.get("state") == "ended", 200, "the service's end")
        assert serve.proc.wait(30) == 0
    finally:
        serve.kill()
    summary = json.loads(bench.stdout)
    handovers = chain["handovers"]
    assert len(handovers) >= 3, (serve.log.read_text(), chain)
    assert summary["failed"] == 0, (summary["errors_by_kind"], serve.log.read_text())
    # Each predecessor was ended by aegis after its successor was ready, with walltime to spare.
    for h in handovers:
        old = chain["jobs"][h["old"] - 1]
        assert old["end_reason"] == "handed over" and h["old_walltime_left"] > 0, (old, h)
        assert slurm_cluster.sacct_state(old["job_id"]) == "COMPLETED"  # not TIMEOUT: aegis stopped it
        assert h["old_ended"] >= h["at"] and h["overlap_node_hours"] > 0
        assert old["tokens"] > 0  # its engines' generation-token counter, read before it was stopped
    assert all(j["why"] == "initial" or j["why"].startswith("successor") for j in chain["jobs"])
    assert chain["jobs"] and all(j["nodes"] == 1 for j in chain["jobs"])
    status = subprocess.run([sys.executable, "-m", "aegis", "serve", "--status", str(serve.sdir)],
                            capture_output=True, text=True)
    assert status.returncode == 0 and "in overlaps" in status.stdout and "handover 1 -> 2" in status.stdout
    assert "generated tokens per node-hour" in status.stdout
    # TTFT while handing over (from the successor ready to its predecessor ended, +-5 s) vs the rest.
    records = [json.loads(line) for line in (tmp_path / "bench" / "requests.jsonl").read_text().splitlines()]
    near = [any(h["at"] - 5 <= r["sent_unix"] <= h["old_ended"] + 5 for h in handovers) for r in records]
    during = sorted(r["ttft_ms"] for r, n in zip(records, near) if n)
    steady = sorted(r["ttft_ms"] for r, n in zip(records, near) if not n)
    p99 = lambda xs: xs[int(0.99 * (len(xs) - 1))]  # noqa: E731
    print(f"p99 TTFT during handovers {p99(during):.1f} ms ({len(during)} requests), steady {p99(steady):.1f} ms")
    assert len(during) > 20 and p99(during) <= 2 * p99(steady), (p99(during), p99(steady))


def test_a_held_successor_and_a_cancelled_job(slurm_cluster, tmp_path):
    serve = ServeProc(slurm_cluster, tmp_path, sim_config(tmp_path), duration=600, lead=75)
    blocker = None
    try:
        chain = serve.wait(lambda c: "serving" in roles(c), 120, "job 1 serving")
        url, key = chain["gateway"], serve.key
        job1 = chain["jobs"][0]
        # A blocker holds the two other nodes: the successor cannot start while job 1 holds its node.
        script = tmp_path / "blocker.sh"
        script.write_text("#!/bin/sh\nsleep 900\n")
        blocker = slurm_cluster.sbatch(script, "--nodes=2", "--exclusive", "--time=00:20:00", "--account=aegis",
                                       "--partition=debug")
        slurm_cluster.wait_state(blocker, {"RUNNING"}, timeout=60)
        chain = serve.wait(lambda c: len(c["jobs"]) >= 2, 150, "the successor submitted")
        chain = serve.wait(lambda c: any("is still pending" in n for n in c["notes"]), 120, "the user told")
        note = next(n for n in chain["notes"] if "is still pending" in n)
        assert "Resources" in note and "serves until its walltime ends" in note, note
        assert call(url + "/v1/completions", key, {"model": "sim-chain", "prompt": "x", "max_tokens": 2})[0] == 200
        # Job 1 reaches its walltime; the successor starts on its node and takes over.
        chain = serve.wait(lambda c: c["jobs"][1]["role"] == "serving", 240, "job 2 serving")
        assert chain["jobs"][0]["role"] == "ended" and "timeout" in chain["jobs"][0]["end_reason"], chain["jobs"][0]
        assert slurm_cluster.sacct_state(job1["job_id"]) == "TIMEOUT"
        assert call(url + "/v1/completions", key, {"model": "sim-chain", "prompt": "x", "max_tokens": 2})[0] == 200
        # Job 2 is cancelled mid-service: a replacement is submitted at once and serves.
        slurm_cluster.run("scancel", chain["jobs"][1]["job_id"])
        chain = serve.wait(lambda c: len(c["jobs"]) >= 3 and c["jobs"][2]["role"] == "serving", 180,
                           "the replacement serving")
        assert "replacement" in chain["jobs"][2]["why"] and chain["jobs"][1]["role"] == "ended"
        assert call(url + "/v1/completions", key, {"model": "sim-chain", "prompt": "x", "max_tokens": 2})[0] == 200
        assert subprocess.run([sys.executable, "-m", "aegis", "serve", "--stop", str(serve.sdir)]).returncode == 0
        chain = serve.wait(lambda c: c.get("state") == "ended", 180, "the service's end")
        assert all(j["role"] == "ended" for j in chain["jobs"])
    finally:
        if blocker:
            slurm_cluster.run("scancel", blocker, check=False)
        serve.kill()
