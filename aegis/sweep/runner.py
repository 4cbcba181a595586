"""Run sweep points: inline (one after another in this allocation or on the local site) or one job each.

One point, wherever it runs (`run_point`, also what a point's job script runs as
`aegis sweep-point DIR`):

1. earlier attempts' results are moved to `DIR/attempts/N/` (nothing is lost);
2. `aegis launch` starts the point's servers (its own process group), and the
   health gate waits for `endpoints.json` to say every instance is ready
   (failed instances, a launcher that exits, or the health timeout end the point);
3. the steps run in turn (`aegis bench` warm-up, bench, probe), each writing its
   results under `DIR/<step>/`; before every step after the first, the prefix
   cache of every instance is reset where the server allows it
   (`POST /reset_prefix_cache`: vLLM serves it only with VLLM_SERVER_DEV_MODE=1);
4. the servers are shut down (the launcher's `shutdown` file, then signals);
5. `DIR/status.json` records the outcome: done, failed (with the reason: OOM,
   not healthy, a step's error) or interrupted.

A finished point (done or failed) is never run again unless asked (`--rerun`,
`--retry-failed`); interrupted and never-started points run on `--resume`.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from aegis.errors import AegisError
from aegis.launch.endpoints import EndpointsFile, RunState
from aegis.rundir import RunDir
from aegis.sweep.status import PointState, read_status, write_status
from aegis.util.apikey import auth_headers
from aegis.util.procs import stop_groups

ATTEMPTS = "attempts"
# What one attempt leaves in a point directory besides its step directories (moved aside on a re-run).
_NAMES = RunDir(Path("/"))  # only the file names are used
ATTEMPT_FILES = tuple(f.name for f in (_NAMES.point_status, _NAMES.endpoints, _NAMES.launch_log, _NAMES.logs,
                                       _NAMES.nodes, _NAMES.staged))
RESET_TIMEOUT = 30.0  # seconds per POST /reset_prefix_cache
DEFAULT_HEALTH_MARGIN = 120.0  # seconds past the config's startup_timeout before the gate gives up
POLL = 1.0


class Interrupted(AegisError):
    """The sweep was stopped by a signal; the current point was shut down and marked interrupted."""

    exit_code = 130


def _aegis() -> list[str]:
    return [sys.executable, "-m", "aegis"]


def _last_line(path: Path, limit: int = 200) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 8192))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:limit] if lines else ""


def move_previous_attempt(point_dir: Path, step_dirs: list[str]) -> Path | None:
    """Move what an earlier attempt left (results, logs, status) to attempts/N/; returns where."""
    names = [n for n in (*step_dirs, *ATTEMPT_FILES) if (point_dir / n).exists()]
    if not names:
        return None
    root = point_dir / ATTEMPTS
    root.mkdir(exist_ok=True)
    n = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    dest = root / str(n)
    dest.mkdir()
    for name in names:
        shutil.move(str(point_dir / name), str(dest / name))
    return dest


def reset_prefix_cache(doc: EndpointsFile, key: str | None, tries: int = 5) -> str:
    """POST /reset_prefix_cache to every ready instance: 'reset', or why not ('unavailable ...')."""
    return asyncio.run(_reset_prefix_cache(doc, key, tries))


async def _reset_prefix_cache(doc: EndpointsFile, key: str | None, tries: int) -> str:
    headers = auth_headers(key)
    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=RESET_TIMEOUT)) as session:
        for inst in doc.ready_instances():
            for _attempt in range(tries):
                try:
                    async with session.post(inst.url + "/reset_prefix_cache", data=b"", headers=headers) as resp:
                        status = resp.status
                        body = await resp.text(errors="replace")
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                    return f"failed on {inst.name}: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
                if status in (404, 405):
                    return (f"unavailable (HTTP {status}): vLLM serves /reset_prefix_cache only with "
                            "VLLM_SERVER_DEV_MODE=1 in the config's env")
                if status >= 400:
                    return f"failed on {inst.name}: HTTP {status}"
                try:
                    answer = json.loads(body) if body.strip() else {}
                except ValueError:
                    answer = {}
                if not isinstance(answer, dict) or answer.get("success", True):
                    results.append(inst.name)
                    break
                await asyncio.sleep(1.0)  # blocks still held by finishing requests: try again
            else:
                return f"failed on {inst.name}: the server kept answering success=false"
    return "reset" if results else "no ready instance"


class PointRunner:
    """Runs one point in this allocation (or on this machine): launch, gate, steps, shutdown, status."""

    def __init__(self, point_dir: Path, echo: Callable[[str], None] = print, prefix: str = ""):
        self.dir = Path(point_dir).absolute()
        self.rundir = RunDir(self.dir)
        info = json.loads(self.rundir.point.read_text())
        self.info = info
        self.steps: list[dict] = info.get("steps") or []
        self.run_opts: dict = info.get("run") or {}
        self.echo = echo
        self.prefix = prefix or f"{info.get('label', self.dir.name)} ({info.get('hash', '?')})"
        self.launcher: subprocess.Popen | None = None
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        self.status: dict = {}

    # -- helpers -----------------------------------------------------------------------

    def _say(self, msg: str) -> None:
        self.echo(f"{self.prefix}: {msg}")

    def _save(self, **update) -> None:
        self.status.update(update)
        write_status(self.dir, self.status)

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            try:  # the bench saves what finished and exits on SIGINT
                os.killpg(self.child.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def _endpoints(self) -> EndpointsFile | None:
        return self.rundir.read_endpoints()

    def _health_timeout(self) -> float:
        if self.run_opts.get("health_timeout"):
            return float(self.run_opts["health_timeout"])
        from aegis.config.schema import load_yaml

        startup = load_yaml(self.rundir.config).get("startup_timeout", 1800)
        return float(startup) + DEFAULT_HEALTH_MARGIN

    # -- phases ------------------------------------------------------------------------

    def _launch(self) -> None:
        cmd = _aegis() + ["launch", "--run-dir", str(self.dir), "--site-file", str(self.rundir.site),
                          str(self.rundir.config)]
        with open(self.rundir.launch_log, "ab") as log:
            self.launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, cwd=str(self.dir),
                                             env={**os.environ, "AEGIS_RUN_DIR": str(self.dir)})

    def _gate(self) -> str | None:
        """Wait until every instance is ready; None, or why the point cannot be measured."""
        timeout = self._health_timeout()
        t0 = time.monotonic()
        while self.stop_signal is None:
            doc = self._endpoints()
            if doc is not None and doc.state == RunState.READY:
                ready = [i.ready_seconds or 0 for i in doc.instances]
                self.status["ready_seconds"] = max(ready, default=None)
                return None
            if doc is not None and doc.state in (RunState.FAILED, RunState.DEGRADED, RunState.STOPPED):
                errors = [f"{i.name}: {i.error}" for i in doc.instances if i.error]
                return "not healthy: " + ("; ".join(errors)[:600] or doc.state.value)
            assert self.launcher is not None  # _launch() came first
            code = self.launcher.poll()
            if code is not None:
                return f"the launcher exited ({code}) before the instances were ready: " \
                       f"{_last_line(self.rundir.launch_log)}"
            if time.monotonic() - t0 > timeout:
                return f"not healthy after {timeout:.0f} s (run.health_timeout); logs: {self.rundir.logs}"
            time.sleep(POLL)
        return None

    def _run_step(self, step: dict) -> str | None:
        out = self.dir / step["subdir"]
        log_path = self.rundir.log(step["step"])
        cmd = _aegis() + list(step["args"]) + ["--endpoints", str(self.dir), "--output-dir", str(out)]
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            self.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, cwd=str(self.dir))
            code = self.child.wait()
            self.child = None
        record = {"exit_code": code, "seconds": round(time.monotonic() - t0, 1), "log": str(log_path)}
        self.status.setdefault("steps", {})[step["step"]] = record
        self._save()
        if self.stop_signal is not None:
            return None
        if code != 0:
            return f"{step['step']} exited {code}: {_last_line(log_path)} (log: {log_path})"
        summary = out / "summary.json"
        if summary.exists():
            try:
                s = json.loads(summary.read_text())
                self._say(f"{step['step']}: {s.get('completed', 0)} ok, {s.get('failed', 0)} failed, "
                          f"{s.get('output_throughput', 0):.1f} output tok/s, "
                          f"p95 TTFT {s.get('p95_ttft_ms', 0):.0f} ms")
            except (OSError, ValueError):
                pass
        else:
            self._say(f"{step['step']}: finished in {record['seconds']} s")
        return None

    def _shutdown(self) -> None:
        """Stop the launcher: the `shutdown` file and SIGTERM (it stops its agents and engines), then force."""
        launcher = self.launcher
        if launcher is None or launcher.poll() is not None:
            return
        self.rundir.request_shutdown()
        grace = float(self.run_opts.get("shutdown_timeout") or 180)

        def kill_tree() -> None:  # the agents run in their own sessions: the launcher's group does not reach them
            import psutil

            self._say(f"servers still up {grace:.0f} s after the shutdown request; killing them")
            try:
                tree = psutil.Process(launcher.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            for proc in tree:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass

        # SIGTERM also reaches a launcher still staging, before it reads the shutdown file
        stop_groups([launcher], grace, on_kill=kill_tree)

    # -- the whole point ---------------------------------------------------------------

    def run(self) -> dict:
        if (read_status(self.dir) or {}).get("state") == PointState.SUBMITTED:  # this job's own submission record
            self.rundir.point_status.unlink()
        moved = move_previous_attempt(self.dir, [s["subdir"] for s in self.steps])
        if moved is not None:
            self._say(f"earlier attempt moved to {moved}")
        self.rundir.logs.mkdir(exist_ok=True)
        self.status = {"state": PointState.RUNNING, "hash": self.info.get("hash"), "label": self.info.get("label"),
                       "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID"),
                       "steps": {}, "prefix_cache_reset": []}
        self._save()
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        reason = None
        t0 = time.monotonic()
        try:
            self._say("starting the servers")
            self._launch()
            reason = self._gate()
            if reason is None and self.stop_signal is None:
                self._say(f"healthy after {self.status.get('ready_seconds')} s")
                reset = self.run_opts.get("reset_prefix_cache", True)
                for i, step in enumerate(self.steps):
                    if self.stop_signal is not None:
                        break
                    if i > 0 and reset:
                        doc = self.rundir.read_endpoints()
                        result = reset_prefix_cache(doc, doc.api_key()) if doc else "no endpoints file"
                        self.status["prefix_cache_reset"].append({"before": step["step"], "result": result})
                        if result != "reset" and len(self.status["prefix_cache_reset"]) == 1:
                            self._say(f"prefix cache not reset: {result}")
                    reason = self._run_step(step)
                    if reason is not None:
                        break
        finally:
            self._say("stopping the servers")
            self._shutdown()
            for s, h in handlers.items():
                signal.signal(s, h)
        if reason is not None:
            from aegis.report.collect import oom_log

            oom = oom_log(self.dir)
            if oom:
                reason = f"out of memory (log: {oom}); {reason}"
        state = PointState.INTERRUPTED if self.stop_signal is not None else (
            PointState.FAILED if reason else PointState.DONE)
        if state == PointState.INTERRUPTED:
            assert self.stop_signal is not None  # set once by the signal handler, never cleared
            reason = f"stopped by signal {signal.Signals(self.stop_signal).name}"
        self._save(state=state, reason=reason, finished=time.time(), seconds=round(time.monotonic() - t0, 1))
        self._say(f"{state} in {self.status['seconds']} s" + (f": {reason}" if reason else ""))
        return self.status
