"""The head at scale: `aegis launch` of N simulated instances (engine sim, site local-sim) on this machine.

    python benchmarks/scale/bench_head.py [--sizes 10,250] [--watch 30]

For each size (the smallest is the baseline): time from `aegis launch` to every instance
ready, the head's CPU seconds per minute and endpoints.json writes per minute while the
fleet is ready (watched for --watch seconds), and the startup phases (median / slowest
seconds from the job's start). One simulator process per instance (~38 MB each), so the
largest size is bounded by memory, and on a 2-core machine start-up is CPU-bound.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from aegis.launch.endpoints import EndpointsFile


def one(n: int, workdir: Path, watch: float) -> dict:
    cfg = workdir / f"sim-{n}.yaml"
    cfg.write_text(yaml.safe_dump({"site": "local-sim", "model": "sim", "engine": "sim", "instances": n,
                                   "port_start": 20000, "startup_timeout": 900, "extra_args": ["--decode-ms", "1"]}))
    run = workdir / f"run-{n}"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "aegis", "launch", str(cfg), "--run-dir", str(run)],
                            stdout=open(workdir / f"launch-{n}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        while True:
            doc = EndpointsFile.read_optional(run / "endpoints.json")
            if doc is not None and doc.state.value == "ready":
                ready = time.monotonic() - t0
                break
            if proc.poll() is not None:
                raise SystemExit(f"aegis launch exited; see {workdir / f'launch-{n}.log'}")
            time.sleep(0.2)
        head = psutil.Process(proc.pid)
        cpu0, rev0, w0 = sum(head.cpu_times()[:2]), doc.revision, time.monotonic()
        time.sleep(watch)
        doc = EndpointsFile.read(run)
        minutes = (time.monotonic() - w0) / 60
        return {"n": n, "ready_s": ready, "cpu_per_min": (sum(head.cpu_times()[:2]) - cpu0) / minutes,
                "writes_per_min": (doc.revision - rev0) / minutes, "phases": doc.phase_table()}
    finally:
        subprocess.run([sys.executable, "-m", "aegis", "shutdown", str(run), "--timeout", "120"],
                       capture_output=True)
        try:
            proc.wait(180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,250", help="instance counts, the first is the baseline")
    ap.add_argument("--watch", type=float, default=30.0, help="seconds to watch the ready fleet")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="aegis-bench-head-") as tmp:
        results = [one(n, Path(tmp), args.watch) for n in sizes]
    base = results[0]
    print(f"{'instances':>10} {'to ready s':>11} {'x base':>7} {'head CPU s/min':>15} {'writes/min':>11}")
    for r in results:
        print(f"{r['n']:>10,} {r['ready_s']:>11.1f} {r['ready_s'] / base['ready_s']:>7.1f} "
              f"{r['cpu_per_min']:>15.2f} {r['writes_per_min']:>11.1f}")
    for r in results:
        print(f"\nstartup phases, {r['n']} instances (seconds from the job's start):\n{r['phases']}")


if __name__ == "__main__":
    main()
