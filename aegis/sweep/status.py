"""A sweep point's status record (status.json in its run directory): its state and what happened."""
from __future__ import annotations

import enum
import json
from pathlib import Path

from aegis.rundir import RunDir
from aegis.util.fs import atomic_write


class PointState(str, enum.Enum):
    """A sweep point's state (written by the point's runner or the sweep driver)."""

    SUBMITTED = "submitted"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


FINISHED = (PointState.DONE, PointState.FAILED)  # never run again unless asked
ACTIVE = (PointState.SUBMITTED, PointState.RUNNING)  # a job of the sweep holds it


def read_status(point_dir: Path) -> dict | None:
    run = RunDir(point_dir)
    return run.read_json(run.point_status)


def write_status(point_dir: Path, doc: dict) -> None:
    atomic_write(RunDir(point_dir).point_status, json.dumps(doc, indent=2) + "\n")
