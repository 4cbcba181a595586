"""The Engine interface: command line and environment of one rank of one instance."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class EngineLaunch:
    """Where one node's part of an instance runs and how it meets the other nodes."""

    model: str  # what the engine loads (a staged local path or the model id)
    served_name: str  # the name clients ask for
    host: str  # address to bind and to be reached at
    port: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    extra_args: list[str] = field(default_factory=list)
    python: str = "python3"
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


class Engine:
    name = "base"
    health_path = "/health"
    models_path = "/v1/models"
    metrics_path = "/metrics"
    api_key_env = ""  # the variable the engine reads its API key from

    def command(self, launch: EngineLaunch) -> list[str]:
        raise NotImplementedError

    def served_name(self, model: str, extra_args: list[str], short_name: str = "") -> str:
        """The name clients ask for: the model id, or for a model given as a path its short name."""
        if short_name and model.startswith(("/", "~", "./", "../")):
            return short_name
        return model
