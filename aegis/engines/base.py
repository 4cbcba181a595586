"""The Engine interface: command line, environment and config files of one rank of one instance."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from aegis.engines.options import EngineOptions


def flag_value(args: list[str], flag: str):
    """The value given to `flag` in `args` ("--f v" or "--f=v"), or None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def lora_module(name: str, path: str, json_when_comma: bool = False) -> str:
    """One adapter item, `name=path`; vLLM reads an item with a comma as JSON, so there it is JSON."""
    if json_when_comma and ("," in name or "," in path):
        return json.dumps({"name": name, "path": path})
    return f"{name}={path}"


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
    master_addr: str | None = None
    master_port: int | None = None
    options: EngineOptions = field(default_factory=EngineOptions)
    lora_adapters: dict = field(default_factory=dict)  # name -> path, resolved from options.lora
    instance: str = "instance"  # the instance's name (names per-instance config files)
    config_dir: str = "."  # where the agent writes per-instance engine config files (mode 0600)
    api_key: bool = False  # the server must require the run's API key
    node_hosts: list[str] = field(default_factory=list)  # addresses of the instance's nodes, head first
    devices_per_node: int = 1  # devices this instance uses on each of its nodes
    device_kind: str = "gpu"  # the site's device kind: gpu, xpu or cpu
    visibility_vars: list[str] = field(default_factory=list)  # the site's device-visibility variables
    node_ip: str | None = None  # this node's IPv4 on the serving network (None: not known, `host` is used)
    cpus: int = 0  # CPU cores this node's part is bound to (0: not planned)
    workarounds: list[str] = field(default_factory=list)  # the site's known issues of this engine to work around
    tmpdir: str = ""  # its temporary files' folder on the node (its environment's TMPDIR; RAY_TMPDIR first
    # for a Ray node); "" when not set

    def script(self, name: str) -> str:
        """A console script installed next to the engine's Python (or on PATH for a bare name)."""
        folder = os.path.dirname(self.python)
        return os.path.join(folder, name) if folder else name

    def config_path(self, suffix: str) -> str:
        return os.path.join(self.config_dir, f"{self.instance}.{suffix}")


class Engine:
    name = "base"
    server = "the engine's server"  # its program, as users know it (messages)
    workarounds: tuple[str, ...] = ()  # known-issue workarounds a site profile may ask for (engine_workarounds)
    health_path = "/health"  # the health gate's first probe (aegis.launch.health)
    models_path = "/v1/models"  # ... and its second: the served name must be listed
    metrics_path: str | None = None  # vLLM-named Prometheus metrics: the agent's stall check reads token progress
    api_key_env = ""  # the variable the engine reads its API key from ("" if it has none)
    served_name_flag = "--served-model-name"
    loaded_marker: bytes | None = None  # a log line's text that says the weights are loaded (startup phases)
    supports_api_key = True  # False: the config must say api_key: false (aegis.config.schema)
    vendors: tuple = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                      "ZE_AFFINITY_MASK", "VLLM_CPU_OMP_THREADS_BIND")  # visibility variables it runs with

    def command(self, launch: EngineLaunch) -> list[str] | None:
        """The argv of this rank, or None when this node runs no process (another rank starts it)."""
        raise NotImplementedError

    lora_json_items = False  # vLLM: an adapter item with a comma must be JSON

    def lora_args(self, launch: EngineLaunch, adapters_flag: str, limit_flags: dict[str, str]) -> list[str]:
        """`--enable-lora ADAPTERS_FLAG name=path ...` and the limits set (`--max-lora-rank` is common)."""
        lora = launch.options.lora
        if lora is None:
            return []
        args = ["--enable-lora"]
        if launch.lora_adapters:
            args += [adapters_flag, *(lora_module(n, p, self.lora_json_items) for n, p in launch.lora_adapters.items())]
        for key, flag in {**limit_flags, "max_lora_rank": "--max-lora-rank"}.items():
            if getattr(lora, key) is not None:
                args += [flag, str(getattr(lora, key))]
        return args

    def feature_env(self, launch: EngineLaunch) -> dict[str, str]:
        """Environment variables the features need (beyond the site's and the user's)."""
        return {}

    def path_env(self, launch: EngineLaunch) -> dict[str, str]:
        """Search-path variables the engine needs a folder first in (prepended to what the node has)."""
        return {}

    def with_paths(self, env: dict[str, str], launch: EngineLaunch) -> dict[str, str]:
        """`env` with path_env's folders first in their variables."""
        for var, folder in self.path_env(launch).items():
            env[var] = folder + (os.pathsep + env[var] if env.get(var) else "")
        return env

    def key_env(self, api_key: str) -> dict[str, str]:
        """Environment that hands the engine its API key (never the command line)."""
        return {self.api_key_env: api_key} if self.api_key_env else {}

    def files(self, launch: EngineLaunch, api_key: str | None) -> dict[str, str]:
        """path -> text of per-instance config files the agent writes (mode 0600) before starting."""
        return {}

    def check_site(self, visibility_vars: list[str]) -> str | None:
        """Why this engine cannot run on a site with these device-visibility variables, or None."""
        if visibility_vars and not set(visibility_vars) & set(self.vendors):
            return (f"engine {self.name!r} does not run on devices selected with "
                    f"{', '.join(visibility_vars)}; choose another engine for this site")
        return None

    def check_multinode(self, options: EngineOptions, device_kind: str = "gpu") -> str | None:
        """Why an instance of this engine (this version, its multi-node backend) cannot span nodes, or None."""
        return None

    def companions(self, launch: EngineLaunch) -> list[tuple[str, list[str]]]:
        """(name, argv) of processes this node runs for the instance beside command()'s (e.g. a Ray head)."""
        return []

    def companion_env(self, launch: EngineLaunch) -> dict[str, str]:
        """Variables command()'s process needs to find its companions (e.g. RAY_ADDRESS)."""
        return {}

    def served_name(self, model: str, extra_args: list[str], short_name: str = "") -> str:
        """The name clients ask for: the flag in extra args, the model id, or for a path its short name."""
        given = flag_value(extra_args, self.served_name_flag)
        if given:
            return given
        if short_name and model.startswith(("/", "~", "./", "../")):
            return short_name
        return model
