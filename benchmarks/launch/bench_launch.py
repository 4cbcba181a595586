"""Time from `aegis launch` to all-healthy, next to the same vLLM server started by hand, in one run.

    python benchmarks/launch/bench_launch.py [--repeat 3] [--instances 1]

Both sides start the tiny offline model with the CPU build of vLLM (set up in
~/.cache/aegis by aegis.testing.cpu_vllm) with the same engine arguments. "By hand"
is `python -m vllm.entrypoints.openai.api_server ...` polled on /health and
/v1/models every 0.1 s; "aegis" is `aegis launch config.yaml` until
endpoints.json says ready (then its startup phases are printed: staged, engine
started, weights loaded, ready). Runs alternate (hand, aegis, hand, aegis, ...) so
that load drifts hit both; medians and the ratio aegis/hand are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from aegis.launch.endpoints import EndpointsFile
from aegis.testing.cpu_vllm import ensure_tiny_model, ensure_vllm_venv

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
ARGS = ["--max-model-len", "512", "--dtype", "bfloat16", "--enforce-eager"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(url: str, name: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            if r.status != 200:
                return False
        with urllib.request.urlopen(url + "/v1/models", timeout=1) as r:
            return name in [m["id"] for m in json.loads(r.read())["data"]]
    except OSError:
        return False


def by_hand(python: Path, model: Path, workdir: Path) -> float:
    port = free_port()
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", "tiny", *ARGS]
    env = {**os.environ, **ENV, "VLLM_CPU_OMP_THREADS_BIND": "0"}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=open(workdir / "hand.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        while not ready(f"http://127.0.0.1:{port}", "tiny"):
            if proc.poll() is not None:
                raise SystemExit(f"the hand-started server exited; see {workdir / 'hand.log'}")
            time.sleep(0.1)
        return time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def with_aegis(python: Path, model: Path, workdir: Path, instances: int) -> tuple[float, str]:
    """Seconds to all ready, and the startup phases table of endpoints.json."""
    cfg = {"site": "local", "model": str(model), "name": "tiny", "instances": instances,
           "engine_python": str(python), "port_start": free_port(), "env": ENV, "extra_vllm_args": ARGS}
    cfg_path = workdir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = workdir / f"run-{time.time_ns()}"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "aegis", "launch", str(cfg_path), "--run-dir", str(run)],
                            stdout=open(workdir / "aegis.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            try:
                if json.loads((run / "endpoints.json").read_text())["state"] == "ready":
                    return time.monotonic() - t0, EndpointsFile.read(run).phase_table()
            except (OSError, ValueError, KeyError):
                pass
            if proc.poll() is not None:
                raise SystemExit(f"aegis launch exited; see {workdir / 'aegis.log'}")
            time.sleep(0.1)
    finally:
        subprocess.run([sys.executable, "-m", "aegis", "shutdown", str(run)], capture_output=True)
        proc.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--instances", type=int, default=1, help="instances aegis launches (hand starts one)")
    args = ap.parse_args()
    python = ensure_vllm_venv()
    model = ensure_tiny_model(python)
    hand, aegis, phases = [], [], ""
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            hand.append(by_hand(python, model, Path(tmp)))
            took, phases = with_aegis(python, model, Path(tmp), args.instances)
            aegis.append(took)
            print(f"run {i + 1}: by hand {hand[-1]:.1f} s, aegis launch {aegis[-1]:.1f} s", flush=True)
    h, a = statistics.median(hand), statistics.median(aegis)
    print(f"\nmedian over {args.repeat} runs (load average {os.getloadavg()[0]:.1f}):")
    print(f"  vLLM started by hand, to healthy:    {h:6.1f} s")
    print(f"  aegis launch ({args.instances} instance), to all ready: {a:6.1f} s")
    print(f"  ratio aegis / by hand:               {a / h:6.2f}")
    print(f"\nstartup phases of the last aegis run (seconds from the job's start):\n{phases}")


if __name__ == "__main__":
    main()
