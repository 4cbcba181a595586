"""The service record of `aegis serve`: its jobs, handovers and node-hours (service.json, replaced atomically).

A service directory holds one run directory per job (`job-1`, `job-2`, ...), the
gateway's own key (`gateway.key`, 0600), the gateway's info (`gateway.json`), the
runs the gateway follows (`runs.json`), `serve.log`, and `stop` (present: end the
service). `ServiceDir` is the one owner of those names; `Chain` is the record the
controller writes and `aegis serve --status` reads.
"""
from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from aegis.errors import UsageError
from aegis.util.fs import atomic_write

VERSION = 1


class JobRole(str, enum.Enum):
    """Where one job of the chain is in its life, as the controller sees it."""

    QUEUED = "queued"  # submitted, not serving yet
    SERVING = "serving"  # its instances are behind the gateway
    DRAINING = "draining"  # handed over: finishing what it has, then stopping
    ENDED = "ended"


class ChainJob(BaseModel):
    """One job of the chain."""

    model_config = ConfigDict(extra="ignore")
    index: int
    run_dir: str
    job_id: str | None = None
    role: JobRole = JobRole.QUEUED
    why: str = ""  # initial, successor, replacement
    submitted: float = 0.0  # unix times
    started: float | None = None  # its head started (the job's start)
    ready: float | None = None
    ended: float | None = None
    end_reason: str = ""  # handed over, walltime, failed ..., service stopped
    walltime_end: float | None = None  # started + walltime
    nodes: int = 0
    tokens: int | None = None  # generated tokens (its engines' counters, read just before aegis ended it)

    @property
    def node_hours(self) -> float:
        if self.started is None:
            return 0.0
        return self.nodes * ((self.ended or time.time()) - self.started) / 3600.0


class Handover(BaseModel):
    """The successor became ready, then the predecessor was drained and stopped."""

    model_config = ConfigDict(extra="ignore")
    old: int
    new: int
    at: float  # the successor was ready
    old_ended: float | None = None
    overlap_node_hours: float = 0.0  # the successor's nodes while both jobs held theirs
    old_walltime_left: float | None = None  # seconds of the old job's walltime unused when it stopped


class Chain(BaseModel):
    """Every job of one service, its handovers and its gateway."""

    model_config = ConfigDict(extra="ignore")
    version: int = VERSION
    config: str = ""
    site: str = ""
    until: float = 0.0
    lead: float = 0.0
    walltime: float = 0.0
    state: str = "starting"  # starting, serving, stopping, ended
    pid: int | None = None
    host: str = ""
    gateway: str | None = None
    key_file: str = ""
    jobs: list[ChainJob] = []
    handovers: list[Handover] = []
    notes: list[str] = []

    @property
    def node_hours(self) -> float:
        return sum(j.node_hours for j in self.jobs)

    @property
    def overlap_node_hours(self) -> float:
        return sum(h.overlap_node_hours for h in self.handovers)

    def tokens_per_node_hour(self) -> float | None:
        """Generated tokens per node-hour over the jobs whose tokens were counted (None: none was)."""
        counted = [j for j in self.jobs if j.tokens is not None and j.node_hours > 0]
        hours = sum(j.node_hours for j in counted)
        return sum(j.tokens or 0 for j in counted) / hours if hours else None


@dataclass
class ServiceDir:
    """The one owner of a service directory's file names."""

    path: Path

    @property
    def record(self) -> Path:
        return self.path / "service.json"

    @property
    def key(self) -> Path:
        return self.path / "gateway.key"

    @property
    def gateway_info(self) -> Path:
        return self.path / "gateway.json"

    @property
    def runs(self) -> Path:
        return self.path / "runs.json"

    @property
    def log(self) -> Path:
        return self.path / "serve.log"

    @property
    def stop(self) -> Path:
        return self.path / "stop"

    def job_dir(self, index: int) -> Path:
        return self.path / f"job-{index}"

    def write(self, chain: Chain) -> None:
        atomic_write(self.record, chain.model_dump_json(indent=1) + "\n", mode=0o600)

    def write_runs(self, runs: list[str]) -> None:
        atomic_write(self.runs, json.dumps({"runs": runs}) + "\n", mode=0o600)

    def read(self) -> Chain:
        try:
            data = json.loads(self.record.read_text())
        except FileNotFoundError:
            raise UsageError(f"{self.path}: not a service directory (no service.json); give the directory "
                             "`aegis serve` printed") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{self.record}: cannot read the service record: {exc}") from None
        if int(data.get("version", VERSION)) > VERSION:
            raise UsageError(f"{self.record}: written by a newer aegis; upgrade aegis")
        return Chain.model_validate(data)
