"""Start `aegis launch` on the local site as a user would, and tear it down checking nothing is left."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.fixtures.vllm import BASE_ARGS, BASE_ENV

READY_TIMEOUT = float(os.environ.get("AEGIS_VLLM_START_TIMEOUT", "420")) + 120


def free_port_block(count: int) -> int:
    """A port p such that p .. p+count-1 are free on loopback."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 60000:
            continue
        ok = True
        for p in range(base, base + count):
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


class Fleet:
    def __init__(self, run_dir: Path, proc: subprocess.Popen, log: Path):
        self.run_dir, self.proc, self.log = run_dir, proc, log

    def endpoints(self) -> dict:
        try:
            return json.loads((self.run_dir / "endpoints.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    @property
    def key(self) -> str:
        return (self.run_dir / "api_key").read_text().strip()

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.endpoints()
            if doc and predicate(doc):
                return doc
            if self.proc.poll() is not None:
                raise AssertionError(f"aegis launch exited ({self.proc.returncode}) while waiting for {what}:\n"
                                     + self.log.read_text()[-3000:])
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}: {self.endpoints()}\n" + self.log.read_text()[-3000:])

    def processes(self) -> list[psutil.Process]:
        """Every process that belongs to this run (launcher, agent, engines and their children)."""
        out = []
        for p in psutil.process_iter(["cmdline", "environ"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                env = p.info["environ"] or {}
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if str(self.run_dir) in cmd or env.get("AEGIS_TEST_RUN") == str(self.run_dir):
                out.append(p)
        return out


def aegis(*args, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", "aegis", *map(str, args)], capture_output=True, text=True, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def fleet_factory(vllm_env, tmp_path_factory):
    """fleet_factory(**config) -> Fleet: `aegis launch` of the tiny model; stopped at the end of the module."""
    started: list[Fleet] = []

    def start(wait_ready=True, **overrides) -> Fleet:
        d = tmp_path_factory.mktemp("launch")
        instances = overrides.get("instances", 1)
        cfg = {"site": "local", "model": str(vllm_env.model_dir), "name": "tiny", "instances": instances,
               "engine_python": str(vllm_env.python), "port_start": free_port_block(instances),
               "startup_timeout": int(READY_TIMEOUT), "max_restarts": 2, "shutdown_grace": 20,
               "env": dict(BASE_ENV), "extra_vllm_args": list(BASE_ARGS)}
        cfg.update(overrides)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        run_dir = d / "run"
        log = d / "launch.log"
        env = {**os.environ, "AEGIS_TEST_RUN": str(run_dir)}  # inherited by agent and engines
        proc = subprocess.Popen([sys.executable, "-m", "aegis", "launch", str(d / "config.yaml"),
                                 "--run-dir", str(run_dir)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        fleet = Fleet(run_dir, proc, log)
        started.append(fleet)
        if wait_ready:
            fleet.wait(lambda doc: doc.get("state") == "ready", READY_TIMEOUT, "all instances ready")
        return fleet

    yield start
    for fleet in started:
        if fleet.proc.poll() is None:
            aegis("shutdown", fleet.run_dir, "--timeout", "120", check=False)
            try:
                fleet.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(fleet.proc.pid, signal.SIGKILL)
        for p in fleet.processes():  # never leave engines behind, even when a test failed
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
