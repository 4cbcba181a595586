"""Start-up cost of the command line: `aegis --help` and `aegis plan` next to `aegis --version`, in one run.

    python benchmarks/cli/bench_startup.py [--repeat 15]

`--version` imports only the CLI group (the floor of a Python start-up with Click);
`--help` lists every command from aegis.cli.COMMANDS without importing the command
modules; `plan` resolves and places the local example. Runs alternate so that load
drifts hit every command alike; medians and the ratios to `--version` are printed.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {
    "--version": ["--version"],
    "--help": ["--help"],
    "plan": ["plan", str(REPO / "examples" / "multi-model.yaml")],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeat):
        for name, argv in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "aegis", *argv], check=True, capture_output=True, cwd=REPO)
            times[name].append(time.perf_counter() - t0)
    floor = statistics.median(times["--version"])
    print(f"{'command':<12} {'median s':>9} {'x --version':>12}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"aegis {name:<6} {med:>9.3f} {med / floor:>12.2f}")


if __name__ == "__main__":
    main()
