"""The head of `aegis launch`: start the agents (one launcher step), gate on health, publish, shut down.

The head never starts engines itself: one `srun`/`mpiexec` step (or, on the
local site, one process) runs an agent per node. The head checks every
instance concurrently (GET /health, then /v1/models must list the model),
reports per-instance ready times, keeps `endpoints.json` current (atomic,
0600) as instances start, die, restart or fail, and stops everything on
SIGTERM/SIGINT or when `aegis shutdown` drops a `shutdown` file into the run
directory: SIGTERM to the step (srun/mpiexec forward it to the agents, which
stop their engines), SIGKILL after the grace period.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import click
import psutil

from aegis.config import Config
from aegis.errors import AegisError
from aegis.endpoints import probe_all, write_endpoints
from aegis.fsutil import atomic_write
from aegis.sites import Site

SERVING = ("ready",)


class Head:
    def __init__(self, run_dir: Path, site: Site, cfg: Config, plan, alloc, echo=None):
        self.run_dir = run_dir
        self.site = site
        self.cfg = cfg
        self.plan = plan
        self.alloc = alloc
        self.echo = echo or (lambda msg: click.echo(msg, err=True))
        self.stop_requested = False
        self.step: subprocess.Popen | None = None
        self.key: str | None = None
        self.t0 = time.monotonic()
        self.instances: list[dict] = []
        self.since: dict[str, float] = {}
        self.state = "starting"
        self.exit_code = 0

    # -- set-up ------------------------------------------------------------------------

    def _prepare(self) -> None:
        (self.run_dir / "logs").mkdir(exist_ok=True)
        (self.run_dir / "nodes").mkdir(exist_ok=True)
        for stale in [self.run_dir / "shutdown", *(self.run_dir / "nodes").glob("*.json")]:
            stale.unlink(missing_ok=True)
        if self.cfg.api_key:
            self.key = secrets.token_urlsafe(32)
            atomic_write(self.run_dir / "api_key", self.key + "\n", mode=0o600)
        me = psutil.Process()
        atomic_write(self.run_dir / "launch.json", json.dumps(
            {"pid": me.pid, "create_time": me.create_time(), "host": socket.gethostname()}) + "\n")
        from aegis.engines import get_engine

        specs = {m.short_name: m for m in self.cfg.models}
        addresses = [self.site.serve_address.address(h) for h in self.alloc.hosts]
        adapters: dict[str, list[str]] = {}  # model -> LoRA adapter names clients may ask for
        for spec in self.cfg.models:
            lora = spec.lora
            adapters[spec.short_name] = list(lora.resolved()) if lora is not None else []
        for inst in self.plan.instances:
            spec = specs[inst.model_name]
            head = inst.head
            addr = addresses[head.node]
            self.instances.append({
                "name": inst.name, "model": get_engine(spec.engine).served_name(spec.model, spec.engine_args, spec.short_name),
                "lora_adapters": adapters[spec.short_name],
                "url": f"http://{addr}:{inst.port}", "host": addr, "hostname": self.alloc.hosts[head.node],
                "port": inst.port, "node": head.node,
                "devices": [d for p in inst.placement for d in p.devices],
                "nodes": [self.alloc.hosts[p.node] for p in inst.placement],
                "engine": spec.engine, "status": "starting", "pid": None, "restarts": 0,
                "ready_seconds": None, "log": str(self.run_dir / "logs" / f"{inst.name}.log"), "error": None})
            self.since[inst.name] = self.t0

    def _doc(self) -> dict:
        return {"job_id": self.alloc.job_id, "run_dir": str(self.run_dir), "site": self.site.name,
                "scheduler": self.alloc.scheduler, "state": self.state,
                "api_key_file": str(self.run_dir / "api_key") if self.key else None,
                "instances": self.instances}

    def _publish(self) -> None:
        write_endpoints(self.run_dir / "endpoints.json", self._doc())

    # -- the loop ----------------------------------------------------------------------

    def _agent_ranks(self) -> dict[str, list[dict]]:
        """instance name -> the states its ranks' agents report."""
        out: dict[str, list[dict]] = {}
        for path in (self.run_dir / "nodes").glob("*.status.json"):
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for rank in doc.get("ranks", {}).values():
                out.setdefault(rank["instance"], []).append(rank)
        return out

    def _update(self, inst: dict, ranks: list[dict], probe: dict | None) -> bool:
        """New status of one instance; True when it changed."""
        before = (inst["status"], inst["pid"], inst["restarts"])
        now = time.monotonic()
        head = next((r for r in ranks if r["rank"] == 0), None)
        replaced = bool(head and inst["pid"] and head["pid"] and head["pid"] != inst["pid"])
        if head:
            inst["pid"], inst["restarts"] = head["pid"], max(r["restarts"] for r in ranks)
        failed = [r for r in ranks if r["state"] == "failed"]
        if inst["status"] == "failed":
            pass
        elif failed:
            inst["status"] = "failed"
            tail = failed[0].get("log_tail", "").strip().splitlines()
            inst["error"] = (f"exited {failed[0]['exit_code']} after {failed[0]['restarts']} restart(s); "
                             f"log: {failed[0]['log']}" + (f"; last line: {tail[-1][:200]}" if tail else ""))
            self.echo(f"aegis: {inst['name']} failed: {inst['error']}")
        elif replaced or any(r["state"] == "restarting" for r in ranks) or (
                ranks and any(r["pid"] is None for r in ranks) and inst["status"] == "ready"):
            if inst["status"] != "restarting":
                self.since[inst["name"]] = now
                self.echo(f"aegis: {inst['name']} died; restarting (restart {inst['restarts']})")
            inst["status"] = "restarting"
        elif probe is not None and probe["ok"]:
            if inst["status"] != "ready":
                inst["ready_seconds"] = round(now - self.since[inst["name"]], 1)
                inst["error"] = None
                self.echo(f"aegis: {inst['name']} ready at {inst['url']} after {inst['ready_seconds']} s")
            inst["status"] = "ready"
        elif inst["status"] == "ready":
            inst["status"] = "unhealthy"
            inst["error"] = probe.get("error") if probe else None
            self.since[inst["name"]] = now
        elif inst["status"] in ("starting", "restarting", "unhealthy") and \
                now - self.since[inst["name"]] > self.cfg.startup_timeout:
            inst["status"] = "failed"
            inst["error"] = (f"not healthy after {self.cfg.startup_timeout} s ({probe.get('error') if probe else ''}); "
                             f"log: {inst['log']}")
            self.echo(f"aegis: {inst['name']} failed: {inst['error']}")
        return (inst["status"], inst["pid"], inst["restarts"]) != before

    def _overall(self) -> str:
        states = [i["status"] for i in self.instances]
        if all(s == "ready" for s in states):
            return "ready"
        if all(s == "failed" for s in states):
            return "failed"
        if any(s == "failed" for s in states) and not any(s in ("starting",) for s in states):
            return "degraded"
        if self.state in ("ready", "degraded"):
            return "degraded"
        return "starting"

    async def _loop(self) -> None:
        announced = False
        while not self.stop_requested:
            if (self.run_dir / "shutdown").exists():
                self.echo("aegis: shutdown requested")
                break
            code = self.step.poll()
            if code is not None:
                self.echo(f"aegis: the agents' launcher step exited ({code}); see {self.run_dir / 'logs' / 'agents.log'}")
                for inst in self.instances:
                    if inst["status"] != "failed":
                        inst["status"], inst["error"] = "failed", f"agent step exited ({code})"
                self.exit_code = 1
                break
            ranks = self._agent_ranks()
            live = [i for i in self.instances if i["status"] != "failed"]
            probes = dict(zip([i["name"] for i in live], await probe_all(live, self.key)))
            changed = False
            for inst in self.instances:
                changed |= self._update(inst, ranks.get(inst["name"], []), probes.get(inst["name"]))
            state = self._overall()
            if changed or state != self.state:
                self.state = state
                self._publish()
            if state == "ready" and not announced:
                announced = True
                slowest = max(i["ready_seconds"] or 0 for i in self.instances)
                self.echo(f"aegis: all {len(self.instances)} instance(s) ready in {slowest} s; "
                          f"endpoints: {self.run_dir / 'endpoints.json'}")
            if state == "failed":
                self.echo("aegis: every instance failed; stopping")
                self.exit_code = 1
                break
            await asyncio.sleep(2.0 if state == "ready" else 1.0)

    # -- shutdown ----------------------------------------------------------------------

    def _stop(self) -> None:
        self.state = "stopping"
        self._publish()
        grace = self.cfg.shutdown_grace + 15
        if self.step is not None and self.step.poll() is None:
            try:
                os.killpg(self.step.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.step.wait(grace)
            except subprocess.TimeoutExpired:
                self.echo(f"aegis: agents still running after {grace} s; killing them")
                try:
                    os.killpg(self.step.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.step.wait()
        for inst in self.instances:
            if inst["status"] != "failed":
                inst["status"] = "stopped"
            inst["pid"] = None
        self.state = "stopped" if self.exit_code == 0 else "failed"
        self._publish()
        self.echo(f"aegis: all instances stopped ({self.run_dir})")

    def _stage(self) -> None:
        """Broadcast each model_source to node-local storage once (one rank per node), before any engine."""
        from aegis.launchers import per_node_step
        from aegis.staging import stage

        staged = {}
        root = Path(os.path.expandvars(os.path.expanduser(self.site.local_storage))) / "aegis-models"
        for spec in self.cfg.models:
            if not spec.model_source:
                continue
            src = Path(os.path.expanduser(spec.model_source))
            hf_layout = src.name.startswith("models--")
            dest = root / "hub" / src.name if hf_layout else root / spec.short_name
            self.echo(f"aegis: staging {src} to {dest} on {len(self.alloc.hosts)} node(s)")
            t0 = time.monotonic()
            summary = stage(str(src), str(dest), launcher=per_node_step(self.site, len(self.alloc.hosts), []))
            self.echo(f"aegis: staged {summary.get('bytes', 0) / 1e9:.2f} GB in {time.monotonic() - t0:.1f} s"
                      + (" (already there)" if summary.get("skipped") else ""))
            # An HF cache repo is found by its id through HF_HOME; a plain directory is loaded by path.
            staged[spec.short_name] = {"hf_home": str(root), "model": spec.model} if hf_layout else \
                {"model": str(dest)}
        atomic_write(self.run_dir / "staged.json", json.dumps(staged, indent=2) + "\n")

    def run(self, step_argv: list[str]) -> int:
        self._prepare()
        self._publish()
        try:
            self._stage()
        except Exception as exc:  # StageError and OSErrors: the run fails with the reason, nothing started
            for inst in self.instances:
                inst["status"], inst["error"] = "failed", f"staging failed: {exc}"
            self.state = "failed"
            self._publish()
            if isinstance(exc, AegisError):
                raise
            raise AegisError(f"staging failed: {exc}") from None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *a: setattr(self, "stop_requested", True))
        self.echo(f"aegis: starting {len(self.instances)} instance(s) on {len(self.alloc.hosts)} node(s) "
                  f"({self.alloc.scheduler} {self.alloc.job_id or ''}); logs: {self.run_dir / 'logs'}")
        with open(self.run_dir / "logs" / "agents.log", "ab") as log:
            self.step = subprocess.Popen(step_argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            asyncio.run(self._loop())
        finally:
            self._stop()
        return self.exit_code
