"""A run directory: the resolved config, plan, job script, job id, logs and endpoints of one run."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from aegis.errors import UsageError

JOB_ID = "job_id"
CONFIG = "config.yaml"
PLAN = "plan.json"
SCRIPT = "job.sh"
ENDPOINTS = "endpoints.json"


@dataclass
class RunDir:
    path: Path

    @property
    def job_id(self) -> Optional[str]:
        try:
            return (self.path / JOB_ID).read_text().strip() or None
        except FileNotFoundError:
            return None

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def endpoints_path(self) -> Path:
        return self.path / ENDPOINTS

    def site_name(self) -> Optional[str]:
        from aegis.config import load_yaml

        if not self.config_path.exists():
            return None
        site = load_yaml(self.config_path).get("site")
        return site if isinstance(site, str) else None

    def endpoints(self) -> Optional[dict]:
        """The endpoints file, or None while there is none (it is replaced atomically, never partial)."""
        try:
            return json.loads(self.endpoints_path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return None

    def job_log(self) -> Optional[Path]:
        """The scheduler's output file of the job (Slurm slurm-<id>.out, PBS pbs.out, local job.out)."""
        job_id = (self.job_id or "").split(".")[0]
        for name in (f"slurm-{job_id}.out", "pbs.out", "job.out", f"job.sh.o{job_id}"):
            if (self.path / name).exists():
                return self.path / name
        return None


def find_run_dir(arg: Optional[str], runs_dir: str = "runs", marker: str = JOB_ID) -> Optional[RunDir]:
    """RUN_DIR as given; no argument: the newest run directory under `runs_dir`; a job id: None.

    `marker` is the file that makes a directory a run directory for the caller: `job_id` for
    submitted runs, `launch.json` for anything `aegis launch` started (also by hand).
    """
    if arg is None:
        root = Path(runs_dir)
        candidates = [p for p in root.glob("*") if (p / marker).exists()] if root.is_dir() else []
        if not candidates:
            raise UsageError(f"no run directory given and none under {root}/: pass RUN_DIR or JOB_ID")
        return RunDir(max(candidates, key=lambda p: (p / marker).stat().st_mtime).absolute())
    path = Path(arg)
    if path.is_dir():
        if not (path / marker).exists():
            what = "a submitted run directory" if marker == JOB_ID else "a launched run directory"
            raise UsageError(f"{path} is not {what} (it has no {marker} file)")
        return RunDir(path.absolute())
    if os.sep in arg:
        raise UsageError(f"{arg}: no such run directory")
    return None
