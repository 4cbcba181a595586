"""`aegis plan --json` at scale: 12, 1,200 and 120,000 TP-1 instances on Aurora, with the ratio to the smallest.

    python benchmarks/scale/bench_plan.py [--repeat 3]

Each size is a fresh `python -m aegis plan CONFIG --json` (Python start-up included, as a user
sees it); runs alternate between sizes so that load drifts hit all of them. Prints the median
wall time, its ratio to the 12-instance plan, the peak memory (ru_maxrss of the child) and the
size of the JSON. Issue 14's target: 120,000 instances within 3 x the 12-instance time (each model
on nodes of its own is one block in the plan, so the JSON does not grow with the instance count).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (12, 1_200, 120_000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="aegis-bench-plan-"))
    configs = {}
    for n in SIZES:
        configs[n] = tmp / f"plan-{n}.yaml"
        configs[n].write_text(f"site: aurora\nmodel: meta-llama/Llama-3.1-8B-Instruct\ninstances: {n}\n")
    times: dict[int, list[float]] = {n: [] for n in SIZES}
    peak: dict[int, int] = {}
    size: dict[int, int] = {}
    for _ in range(args.repeat):
        for n in SIZES:
            out = tmp / f"plan-{n}.json"
            with open(out, "wb") as fh:
                t0 = time.perf_counter()
                pid = subprocess.Popen([sys.executable, "-m", "aegis", "plan", str(configs[n]), "--json"],
                                       stdout=fh).pid
                _, status, usage = os.wait4(pid, 0)
                times[n].append(time.perf_counter() - t0)
            if status != 0:
                raise SystemExit(f"aegis plan failed for {n} instances")
            peak[n] = max(peak.get(n, 0), usage.ru_maxrss)
            size[n] = out.stat().st_size
    base = statistics.median(times[SIZES[0]])
    print(f"{'instances':>10} {'median s':>9} {'x 12':>6} {'peak MB':>8} {'JSON kB':>8}")
    for n in SIZES:
        med = statistics.median(times[n])
        print(f"{n:>10,} {med:>9.2f} {med / base:>6.1f} {peak[n] / 1024:>8.0f} {size[n] / 1e3:>8.1f}")


if __name__ == "__main__":
    main()
