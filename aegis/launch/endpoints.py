"""The endpoints file: a versioned, typed record (JSON, mode 0600, replaced atomically) and its views.

The head of `aegis launch` is its only writer; `aegis endpoints`, `health`,
`status`, `submit --wait`, bench, warm and sweeps read it through
`EndpointsFile.read`. A hand-written file for endpoints aegis did not start is
read too: an instance needs only `url` (or `host` and `port`); without a
`status` it is taken as ready, without a `name` it is `instance-N`. Shape
(version 1):

    {"version": 1, "job_id", "run_dir", "site", "scheduler", "state": RunState,
     "api_key_file": "<run_dir>/api_key" or null, "updated": <unix time>,
     "revision": <writes so far>, "started": <unix time the job started>, "gateway": <URL> or null,
     "instances": [{"name", "model", "lora_adapters", "url", "host", "hostname", "port", "node",
                    "devices", "nodes", "engine", "status": InstanceState, "pid", "restarts",
                    "ready_seconds", "phases": {PHASE: seconds since "started"}, "log", "error"}]}

PHASES, in order: staged (weights on node-local storage), started (engine process
started), loaded (the engine's log says its weights are loaded), ready (health gate
passed); each is the first time it happened (restarts do not move it).
"""
from __future__ import annotations

import enum
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from aegis.errors import AegisError, UsageError
from aegis.rundir import RunDir
from aegis.util.fs import atomic_write

VERSION = 1
PHASES = ("staged", "started", "loaded", "ready")  # startup phases, in order (InstanceEndpoint.phases)


class InstanceState(str, enum.Enum):
    """Where one instance is in its life (the head decides, from the agents' reports and health probes)."""

    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"  # `aegis drain`: serving its in-flight requests, taking no new ones
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


class RunState(str, enum.Enum):
    """The state of a whole run, derived from its instances."""

    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (RunState.STOPPED, RunState.FAILED)


class InstanceEndpoint(BaseModel):
    """One engine server as clients and tools see it."""

    model_config = ConfigDict(extra="ignore", use_enum_values=False)

    name: str
    model: str = ""  # the served name ("" in a hand-written file that does not say)
    url: str
    host: str = ""
    port: int | None = None
    hostname: str = ""
    node: int = 0
    lora_adapters: list[str] = []
    devices: list[str] = []
    nodes: list[str] = []
    engine: str = "vllm"
    status: InstanceState = InstanceState.READY  # the head always sets it; a hand-written entry is serving
    pid: int | None = None
    restarts: int = 0
    ready_seconds: float | None = None
    phases: dict[str, float] = {}  # PHASES -> seconds from the job's start (EndpointsFile.started)
    log: str | None = None
    error: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _hand_written(cls, data: Any) -> Any:
        """Accept what people write by hand: host+port for url, adapters given as {"name": ...}."""
        if isinstance(data, dict):
            data = dict(data)
            if not data.get("url") and data.get("host") and data.get("port"):
                data["url"] = f"http://{data['host']}:{data['port']}"
            adapters = data.get("lora_adapters")
            if isinstance(adapters, list):
                data["lora_adapters"] = [a.get("name") if isinstance(a, dict) else a for a in adapters]
            if data.get("model") is None:
                data.pop("model", None)
            for key in ("devices", "nodes"):
                if isinstance(data.get(key), list):
                    data[key] = [str(x) for x in data[key]]
        return data

    @property
    def ready(self) -> bool:
        return self.status == InstanceState.READY


class EndpointsFile(BaseModel):
    """Every instance of one run, where it listens and what state it is in."""

    model_config = ConfigDict(extra="ignore")

    version: int = VERSION
    job_id: str | None = None
    run_dir: str = ""
    site: str = ""
    scheduler: str = "local"
    state: RunState = RunState.STARTING
    api_key_file: str | None = None
    updated: float = 0.0
    revision: int = 0  # how many times the head has written it (readers reload when it changes)
    started: float | None = None  # unix time the job (its head) started: phases count from here
    gateway: str | None = None  # the run's own gateway (config `gateway: true`): one URL over its instances
    instances: list[InstanceEndpoint] = []

    # -- reading and writing (the only place) ------------------------------------------------

    def write(self, path: Path) -> None:
        self.updated = time.time()
        self.revision += 1
        atomic_write(path, self.model_dump_json(indent=1) + "\n", mode=0o600)

    @classmethod
    def parse(cls, text: str, path: Path) -> EndpointsFile:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{path}: cannot read the endpoints file: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
            raise UsageError(f"{path}: not an endpoints file (expected a JSON object with an 'instances' list)")
        data["instances"] = [dict({"name": f"instance-{i}"}, **inst) if isinstance(inst, dict) else inst
                             for i, inst in enumerate(data["instances"])]
        key_file = data.get("api_key_file")
        if isinstance(key_file, str) and key_file and not os.path.isabs(key_file):
            data["api_key_file"] = str(path.parent / key_file)  # relative to the file
        version = data.get("version", VERSION)
        if not isinstance(version, int) or version > VERSION:
            raise AegisError(f"{path}: endpoints file version {version} is newer than this aegis understands "
                             f"({VERSION}); upgrade aegis")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise UsageError(f"{path}: invalid endpoints file at {where}: {err['msg']}") from None

    @classmethod
    def read(cls, target: str | os.PathLike) -> EndpointsFile:
        """An endpoints file, or the one in a run directory; a clear error when there is none."""
        path = cls.path_of(target)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UsageError(f"{path}: the endpoints file does not exist (has the launcher started?); pass the "
                             "run directory or its endpoints.json") from None
        except OSError as exc:
            raise AegisError(f"{path}: cannot read the endpoints file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not an endpoints file (not UTF-8 JSON text)") from None
        return cls.parse(text, path)

    @staticmethod
    def path_of(target: str | os.PathLike) -> Path:
        """The endpoints file named, or the one of the run directory named."""
        path = Path(target)
        return RunDir(path).endpoints if path.is_dir() else path

    @classmethod
    def read_optional(cls, path: Path) -> EndpointsFile | None:
        """The file, or None while there is none or it cannot be read."""
        try:
            return cls.parse(path.read_text(), path)
        except (OSError, AegisError, UnicodeDecodeError):
            return None

    # -- views -------------------------------------------------------------------------------

    def ready_instances(self) -> list[InstanceEndpoint]:
        return [i for i in self.instances if i.ready]

    @property
    def all_ready(self) -> bool:
        return bool(self.instances) and (self.state == RunState.READY or all(i.ready for i in self.instances))

    def url_view(self, only_ready: bool = True) -> dict[str, list[str]]:
        """model -> [urls]: the view existing benchmark harnesses read."""
        out: dict[str, list[str]] = {}
        for inst in self.instances:
            if only_ready and not inst.ready:
                continue
            out.setdefault(inst.model, []).append(inst.url)
        return out

    def api_key(self) -> str | None:
        """The run's key: AEGIS_API_KEY, else the (0600) file this file names, else OPENAI_API_KEY."""
        from aegis.util.apikey import resolve_api_key

        return resolve_api_key(None, self.api_key_file)

    def to_json(self) -> dict:
        return self.model_dump(mode="json")

    def slowest_phases(self) -> dict[str, float]:
        """phase -> seconds from the job's start when the slowest instance reached it (phases some reached)."""
        out = {}
        for phase in PHASES:
            seen = [i.phases[phase] for i in self.instances if phase in i.phases]
            if seen:
                out[phase] = max(seen)
        return out

    def mark_ended(self, reason: str) -> None:
        """The run ended without its head saying so: it and every instance still live are failed, with why."""
        self.state = RunState.FAILED
        for inst in self.instances:
            if inst.status not in (InstanceState.FAILED, InstanceState.STOPPED):
                inst.status, inst.error = InstanceState.FAILED, reason

    def phase_table(self) -> str:
        """Startup phases over the instances: median and slowest seconds from the job's start, per phase."""
        from aegis.util.tables import format_table

        rows = []
        for phase in PHASES:
            seen = sorted(i.phases[phase] for i in self.instances if phase in i.phases)
            if seen:
                rows.append([phase, f"{seen[len(seen) // 2]:.1f}", f"{seen[-1]:.1f}",
                             f"{len(seen)}/{len(self.instances)}"])
        return format_table(["PHASE", "MEDIAN S", "SLOWEST S", "INSTANCES"], rows, right=(1, 2, 3)) if rows else ""
