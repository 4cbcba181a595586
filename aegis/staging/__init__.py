"""Staging model weights and environments to node-local storage.

`aegis stage SRC DEST` copies a directory or a file from a shared filesystem to
node-local storage on every node of an allocation with an MPI broadcast; the
implementation is the compiled `aegis-stage` (csrc/) when installed, else mpi4py
(`aegis.staging.mpi_stage`); both follow docs/stage.md.

For the launcher (one rank per node; the summary comes back as JSON)::

    from aegis.staging import stage
    summary = stage("/lus/models/llama", "/tmp/models/llama",
                    launcher=["mpiexec", "-n", "4", "--ppn", "1"])   # or ["srun", "--ntasks-per-node=1"]

or build the per-rank command and run it yourself::

    argv = ["srun", "--ntasks-per-node=1", *stage_argv(src, dest, hf_repo="org/name")]

`stage()` raises StageError with the failing hosts when any node failed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO

from aegis.errors import StageError

__all__ = ["find_binary", "stage_argv", "stage"]


def find_binary() -> str | None:
    """The compiled tool: $AEGIS_STAGE_BIN, aegis/_bin/, <repo>/build/, then PATH."""
    env = os.environ.get("AEGIS_STAGE_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (os.path.join(pkg, "_bin", "aegis-stage"),
                 os.path.join(os.path.dirname(pkg), "build", "aegis-stage")):
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return shutil.which("aegis-stage")


def stage_argv(src: str, dest: str, *, impl: str = "auto", **options) -> list[str]:
    """The command each rank runs: `python -m aegis stage ... SRC DEST` (options as in StageOptions)."""
    from aegis.staging.options import StageOptions

    opts = StageOptions(src=str(src), dest=str(dest), **options).validate()
    return [sys.executable, "-m", "aegis", "stage", "--impl", impl, *opts.argv()]


def stage(src: str, dest: str, launcher: Sequence[str], *, impl: str = "auto", env: dict | None = None,
          timeout: float | None = None, **options) -> dict:
    """Run the broadcast under `launcher` (e.g. ["srun", "--ntasks-per-node=1"]); return the JSON summary."""
    options["json"] = True
    argv = [*launcher, *stage_argv(src, dest, impl=impl, **options)]
    r = _run_showing_progress(argv, env, timeout)
    summary = None
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            try:
                summary = json.loads(line)
            except ValueError:
                pass
    if r.returncode != 0 or summary is None:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("aegis: error:")]
        detail = "; ".join(e[len("aegis: error: "):] for e in errors[:5]) or (r.stderr.strip().splitlines() or
                                                                             ["no output"])[-1]
        raise StageError(f"staging {src} to {dest} failed (exit {r.returncode}): {detail}")
    return summary


def _run_showing_progress(argv: list[str], env: dict | None, timeout: float | None) -> subprocess.CompletedProcess:
    """Run argv capturing its output; its progress lines ("aegis-stage: ...", such as waiting for another
    staging into DEST) go to stderr as they come."""
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    except OSError as exc:
        raise StageError(f"could not run {' '.join(argv[:2])} ...: {exc}") from None
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=_pump, args=(proc.stdout, out, False), daemon=True),
               threading.Thread(target=_pump, args=(proc.stderr, err, True), daemon=True)]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise StageError(f"could not run {' '.join(argv[:2])} ...: no result after {timeout} s") from None
    for t in readers:
        t.join()
    return subprocess.CompletedProcess(argv, proc.returncode, "".join(out), "".join(err))


def _pump(stream: IO[str], into: list[str], show_progress: bool) -> None:
    for line in stream:
        into.append(line)
        if show_progress and line.startswith("aegis-stage:"):
            print(line, end="", file=sys.stderr, flush=True)
