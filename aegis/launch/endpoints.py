"""The endpoints file: a versioned, typed record (JSON, mode 0600, replaced atomically) and its views.

The head of `aegis launch` is its only writer; `aegis endpoints`, `health`,
`status`, `submit --wait`, bench, warm and sweeps read it through
`EndpointsFile.read`. Shape (version 1):

    {"version": 1, "job_id", "run_dir", "site", "scheduler", "state": RunState,
     "api_key_file": "<run_dir>/api_key" or null, "updated": <unix time>,
     "instances": [{"name", "model", "lora_adapters", "url", "host", "hostname", "port", "node",
                    "devices", "nodes", "engine", "status": InstanceState, "pid", "restarts",
                    "ready_seconds", "log", "error"}]}
"""
from __future__ import annotations

import enum
import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from aegis.errors import AegisError, UsageError
from aegis.rundir import RunDir
from aegis.util.fs import atomic_write

VERSION = 1


class InstanceState(str, enum.Enum):
    """Where one instance is in its life (the head decides, from the agents' reports and health probes)."""

    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
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
    model: str
    url: str
    host: str = ""
    port: int | None = None
    hostname: str = ""
    node: int = 0
    lora_adapters: list[str] = []
    devices: list[str] = []
    nodes: list[str] = []
    engine: str = "vllm"
    status: InstanceState = InstanceState.STARTING
    pid: int | None = None
    restarts: int = 0
    ready_seconds: float | None = None
    log: str | None = None
    error: str | None = None

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
    instances: list[InstanceEndpoint] = []

    # -- reading and writing (the only place) ------------------------------------------------

    def write(self, path: Path) -> None:
        self.updated = time.time()
        atomic_write(path, self.model_dump_json(indent=1) + "\n", mode=0o600)

    @classmethod
    def parse(cls, text: str, path: Path) -> EndpointsFile:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise AegisError(f"{path}: cannot read the endpoints file: {exc}") from None
        if not isinstance(data, dict):
            raise AegisError(f"{path}: not an endpoints file (expected a JSON object)")
        version = data.get("version", VERSION)
        if not isinstance(version, int) or version > VERSION:
            raise AegisError(f"{path}: endpoints file version {version} is newer than this aegis understands "
                             f"({VERSION}); upgrade aegis")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise AegisError(f"{path}: invalid endpoints file at {where}: {err['msg']}") from None

    @classmethod
    def read(cls, target: str | os.PathLike) -> EndpointsFile:
        """An endpoints file, or the one in a run directory; a clear error when there is none."""
        path = Path(target)
        if path.is_dir():
            path = RunDir(path).endpoints
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UsageError(f"{path}: no endpoints file (has the launcher started?)") from None
        except OSError as exc:
            raise AegisError(f"{path}: cannot read the endpoints file: {exc.strerror}") from None
        return cls.parse(text, path)

    @classmethod
    def read_optional(cls, path: Path) -> EndpointsFile | None:
        """The file, or None while there is none or it cannot be read."""
        try:
            return cls.parse(path.read_text(), path)
        except (OSError, AegisError):
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
        """The run's key: AEGIS_API_KEY / OPENAI_API_KEY, else the (0600) file this file names."""
        from aegis.bench.endpoints import Fleet, resolve_api_key

        return resolve_api_key(None, Fleet(endpoints=[], api_key_file=self.api_key_file))

    def to_json(self) -> dict:
        return self.model_dump(mode="json")
