"""The node status record: what one agent reports about its engine ranks (nodes/N.status.json), typed and versioned."""
from __future__ import annotations

import enum
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from aegis.util.fs import atomic_write

VERSION = 1


class RankState(str, enum.Enum):
    """Where one engine process is (the agent on its node decides)."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


class RankStatus(BaseModel):
    """One engine process: an instance's part on a node."""

    model_config = ConfigDict(extra="ignore")

    instance: str
    rank: int
    part: str = ""  # a companion process of the rank (e.g. "ray-head")
    state: RankState
    pid: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    log: str = ""
    log_tail: str = ""
    started_at: float | None = None  # unix time its current process started
    first_started_at: float | None = None  # ... its first process
    loaded_at: float | None = None  # unix time its log first said the weights are loaded


class NodeStatus(BaseModel):
    """Every engine rank one agent runs, written by that agent after each change."""

    model_config = ConfigDict(extra="ignore")

    version: int = VERSION
    index: int
    host: str
    agent_pid: int
    updated: float
    stopping: bool = False
    ranks: dict[str, RankStatus] = {}  # by rank key: `<instance>`, `<instance>.rank<r>`, `<instance>.<part>`

    def write(self, path: Path) -> None:
        atomic_write(path, self.model_dump_json() + "\n")

    @classmethod
    def read(cls, path: Path) -> NodeStatus | None:
        """The record, or None when missing, being replaced, or written by a newer aegis."""
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("version", VERSION) != VERSION:
                return None
            return cls.model_validate(data)
        except (OSError, ValueError, ValidationError):
            return None
