"""Config files: load YAML, validate it against a schema, merge site defaults and CLI flags.

Precedence, from strongest to weakest: CLI flag > config file > site profile
default > built-in default. A config names one model with top-level keys, or
several under `models:`; both are normalised to `Config.models`.
"""
from __future__ import annotations

import difflib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from aegis.engines.options import EngineOptions, problem
from aegis.errors import ConfigError

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

# Keys that belong to one model; at the top level they describe the single model.
MODEL_KEYS = (
    "model", "name", "instances", "tensor_parallel_size", "pipeline_parallel_size",
    "port_start", "model_source", "extra_vllm_args", "env", "engine",
    "extra_args", "lora", "enable_prefix_caching", "kv_cache_dtype", "enable_expert_parallel",
    "all2all_backend", "enable_eplb", "num_redundant_experts", "engine_version", "multinode_backend",
)
# Keys that may sit at the top level next to `models:` (port_start and env are
# then the defaults every model starts from).
SHARED_KEYS = ("port_start", "env")

# Common spellings users reach for, mapped to the key aegis uses.
SYNONYMS = {
    "partition": "queue", "tp": "tensor_parallel_size", "tp_size": "tensor_parallel_size",
    "pp": "pipeline_parallel_size", "pp_size": "pipeline_parallel_size",
    "replicas": "instances", "num_instances": "instances", "time": "walltime",
    "project": "account", "allocation": "account", "num_nodes": "nodes", "port": "port_start",
    "vllm_args": "extra_vllm_args", "engine_args": "extra_args", "environment": "env",
    "prefix_caching": "enable_prefix_caching", "expert_parallel": "enable_expert_parallel",
    "eplb": "enable_eplb", "loras": "lora",
}
# Whole name parts only: HF_TOKEN and OPENAI_API_KEY are secrets, TOKENIZERS_PARALLELISM is not.
SECRET_WORDS = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|API_?KEY|ACCESS_KEY|PRIVATE_KEY)(_|$)",
                          re.IGNORECASE)
SECRET_HINT = ("secrets must not be written into configs or job scripts: export it in your shell "
               "and list its name in pass_env, or set hf_token_file to a file with mode 0600")

WALLTIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,4}):([0-5]\d):([0-5]\d)$")
# Values that go into #SBATCH/#PBS lines: no whitespace, quotes, '#', '$', ';' or newlines.
DIRECTIVE_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:,+@=/%-]+$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def walltime_seconds(value: str) -> int:
    """'[D-]HH:MM:SS' -> seconds."""
    m = WALLTIME_RE.match(value)
    if not m:
        raise ValueError(value)
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def slugify(text: str) -> str:
    """A short lowercase name usable in job names, file names and instance names."""
    base = text.rstrip("/").rsplit("/", 1)[-1]
    if base.startswith("models--"):
        base = base.split("--")[-1]
    slug = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-._")
    return slug[:48] or "model"


def _no_control(value: str) -> str:
    if CONTROL_RE.search(value):
        raise ValueError("must not contain control characters or newlines")
    return value


def check_name(value: str | None, what: str) -> str | None:
    """Model and job names go into file names, job names and URLs."""
    if value is not None and not MODEL_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid {what}: use lowercase letters, digits, '.', '_' and '-'")
    return value


def check_env_names(names) -> None:
    for name in names:
        if not isinstance(name, str) or not ENV_NAME_RE.match(name):
            raise ValueError(f"{name!r} is not a valid environment variable name")


def _stringify(value: Any, what: str) -> Any:
    """YAML turns 32768 into an int; engine args and env values are strings."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be strings; quote the value {str(value).lower()}")
    if isinstance(value, (int, float)):
        return str(value)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict, EngineOptions):
    """One model: how many instances and how each is parallelised, and its engine's features.

    The feature keys (lora, enable_prefix_caching, kv_cache_dtype, ...) come from EngineOptions.
    """

    model: StrictStr
    name: StrictStr | None = None
    instances: StrictInt = Field(1, gt=0)
    tensor_parallel_size: StrictInt = Field(1, gt=0)
    pipeline_parallel_size: StrictInt = Field(1, gt=0)
    port_start: StrictInt | None = Field(None, ge=1024, le=65535)
    model_source: StrictStr | None = None
    extra_vllm_args: list[StrictStr] = Field(default_factory=list)
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    engine: Literal["vllm", "sglang", "trtllm", "sim"] = "vllm"
    extra_args: list[StrictStr] = Field(default_factory=list)  # engine-neutral name of extra_vllm_args

    @field_validator("model")
    @classmethod
    def _model(cls, v):
        if not v.strip():
            raise ValueError("must not be empty")
        return _no_control(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return check_name(v, "name")

    @field_validator("model_source")
    @classmethod
    def _source(cls, v):
        return None if v is None else _no_control(v)

    @field_validator("extra_vllm_args", "extra_args", mode="before")
    @classmethod
    def _args(cls, v, info):
        if isinstance(v, str):
            raise ValueError('must be a list, e.g. ["--max-model-len", "32768"]')
        if isinstance(v, list):
            v = [_stringify(x, f"{info.field_name} entries") for x in v]
            for x in v:
                if isinstance(x, str):
                    _no_control(x)
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v):
        return _check_env(v)

    @model_validator(mode="after")
    def _engine_keys(self):
        if self.extra_args and self.extra_vllm_args:
            raise ValueError("set extra_args or extra_vllm_args, not both (extra_args is the engine-neutral name)")
        if self.extra_vllm_args and self.engine != "vllm":
            raise ValueError(f"extra_vllm_args: is for engine vllm; use extra_args for {self.engine}")
        why = problem(self.engine, self)
        if why:
            raise ValueError(why)
        if self.engine == "sim":  # the simulator's own parser checks its flags (vLLM's: aegis check)
            from aegis.engines.sim import SimEngine

            why = SimEngine().check_args(self.engine_args)
            if why:
                raise ValueError(f"extra_args: {why}")
        return self

    @property
    def engine_args(self) -> list[str]:
        """The pass-through engine arguments (extra_args or extra_vllm_args)."""
        return list(self.extra_args or self.extra_vllm_args)

    @property
    def devices_per_instance(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def short_name(self) -> str:
        return self.name or slugify(self.model)


def _check_env(v):
    if not isinstance(v, dict):
        return v
    out = {}
    check_env_names(v)
    for key, value in v.items():
        if SECRET_WORDS.search(key):
            raise ValueError(f"{key} looks like a secret; {SECRET_HINT}")
        value = _stringify(value, "env values")
        if isinstance(value, str):
            _no_control(value)
        out[key] = value
    return out


class Config(_Strict):
    """A whole run: global settings plus one or more models."""

    site: StrictStr | None = None
    name: StrictStr | None = None
    walltime: StrictStr = "01:00:00"
    account: StrictStr | None = None
    queue: StrictStr | None = None
    filesystems: StrictStr | None = None
    directives: list[StrictStr] = Field(default_factory=list)
    nodes: StrictInt | None = Field(None, gt=0, le=1_000_000)  # Aurora has 10,624; more is a typo
    hf_home: StrictStr | None = None
    hf_token_file: StrictStr | None = None
    pass_env: list[StrictStr] = Field(default_factory=list)
    port_start: StrictInt = Field(8000, ge=1024, le=65535)
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    pack_models: StrictBool = False
    runs_dir: StrictStr = "runs"
    engine_python: StrictStr | None = None  # the Python that has the engine (default: python3 on PATH)
    startup_timeout: StrictInt = Field(1800, gt=0)  # seconds an instance may take to become healthy
    max_restarts: StrictInt = Field(3, ge=0)  # restarts within restart_window before an instance is marked failed
    restart_window: StrictInt = Field(3600, gt=0)  # seconds: older restarts no longer count against max_restarts
    liveness_interval: StrictInt = Field(10, ge=0)  # seconds between the agent's probes of a started engine (0: off)
    liveness_misses: StrictInt = Field(3, gt=0)  # unanswered probes in a row before a hung engine is restarted
    liveness_stall: StrictInt = Field(300, ge=0)  # seconds with requests running and no token counted: hung (0: off)
    heartbeat_interval: StrictInt = Field(30, gt=0)  # seconds: an agent reports at least this often; 4 missed: lost
    shutdown_grace: StrictInt = Field(30, ge=0)  # seconds between SIGTERM and SIGKILL
    api_key: StrictBool = True  # generate a per-run API key the servers require
    gateway: StrictBool = False  # start `aegis gateway` on the head node: one URL over every instance
    gateway_port: StrictInt = Field(8090, ge=1024, le=65535)  # its port (on the first node's serving address)
    models: list[ModelSpec] = Field(min_length=1)

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v):
        try:
            secs = walltime_seconds(v)
        except ValueError:
            raise ValueError(f"{v!r} is not a walltime: use HH:MM:SS or D-HH:MM:SS, e.g. \"01:00:00\"") from None
        if secs <= 0:
            raise ValueError("must be longer than zero")
        return v

    @field_validator("account", "queue", "filesystems")
    @classmethod
    def _directive_value(cls, v):
        if v is not None and not DIRECTIVE_VALUE_RE.match(v):
            raise ValueError(f"{v!r} contains characters that cannot go into a job-script directive "
                             "(spaces, quotes, '#', '$', ';')")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return check_name(v, "job name")

    @field_validator("directives")
    @classmethod
    def _directives(cls, v):
        for item in v:
            if not item.startswith("-") or any(not DIRECTIVE_VALUE_RE.match(p) for p in item.split(" ")):
                raise ValueError(f"{item!r} is not a scheduler option like \"--qos=high\" or \"-l place=scatter\"")
        return v

    @field_validator("pass_env")
    @classmethod
    def _pass_env(cls, v):
        check_env_names(v)
        return v

    @field_validator("hf_home", "hf_token_file", "runs_dir", "engine_python")
    @classmethod
    def _paths(cls, v):
        return None if v is None else _no_control(v)

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v):
        return _check_env(v)

    @model_validator(mode="after")
    def _models(self):
        if self.api_key:
            from aegis.engines import ENGINES, get_engine

            keyed = ", ".join(n for n in ENGINES if get_engine(n).supports_api_key)
            for spec in self.models:
                if spec.engine in ENGINES and not get_engine(spec.engine).supports_api_key:
                    raise ValueError(f"model {spec.short_name!r}: {get_engine(spec.engine).server} cannot require "
                                     "an API key; "
                                     "set api_key: false (its port is then open to anyone on the serving "
                                     f"network) or choose engine {keyed}")
        if self.gateway and not self.api_key:
            raise ValueError("gateway: true needs api_key: true (the gateway lets in only clients with the run's "
                             "key); remove api_key: false")
        names = [m.short_name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two models are both named {dupes[0]!r}: give each a distinct 'name'")
        # Port ranges are per host and depend on the site's node size: aegis.plan.placement.assign_ports.
        return self

    @property
    def job_name(self) -> str:
        if self.name:
            return self.name
        return "aegis-" + self.models[0].short_name if len(self.models) == 1 else "aegis-multi"

    def dump(self) -> dict:
        """The resolved config as plain data (what is saved into a run directory)."""
        data = self.model_dump(mode="json")
        for i, model in enumerate(data["models"]):  # the engine feature keys after the model's own keys
            data["models"][i] = {**{k: v for k, v in model.items() if k not in EngineOptions.model_fields},
                                 **{k: model[k] for k in EngineOptions.model_fields}}
        return data


# --------------------------------------------------------------------------- loading YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and keeps 1:00:00 a string (YAML 1.1 base-60)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:str", _SEXAGESIMAL, list("-+0123456789"))
for _first in list("-+0123456789"):
    # The string resolver must win over int/float for base-60 looking scalars.
    _Loader.yaml_implicit_resolvers[_first].insert(0, _Loader.yaml_implicit_resolvers[_first].pop())


def load_yaml(path: str | os.PathLike, what: str = "config") -> dict:
    """Read a YAML mapping; any problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a {what} is UTF-8 YAML)") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {what} must be a YAML mapping of keys to values")
    return data


# --------------------------------------------------------------------------- resolving


@dataclass
class Overrides:
    """Values given on the command line. Per-model ones apply to one model."""

    globals: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    for_model: str | None = None
    flag_names: dict = field(default_factory=dict)  # key -> "--flag" (for error messages)


def suggest(key: str, valid) -> str:
    """' (did you mean X?)' for a misspelled key, or ''."""
    low = str(key).lower()
    if low in SYNONYMS and SYNONYMS[low] in valid:
        return f" (did you mean '{SYNONYMS[low]}'?)"
    close = difflib.get_close_matches(low, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_unknown(data: dict, valid, where: str, source: str):
    for key in data:
        if key in valid:
            continue
        if isinstance(key, str) and SECRET_WORDS.search(key):
            raise ConfigError(f"{source}: {where}{key}: {SECRET_HINT}")
        raise ConfigError(f"{source}: {where}{key}: unknown key{suggest(key, valid)}")


def normalise(raw: dict, source: str) -> tuple[dict, bool]:
    """Turn the single-model shape into `models: [...]`. Returns (data, was_single)."""
    data = dict(raw)
    global_keys = set(Config.model_fields) - {"models"}
    model_keys = set(ModelSpec.model_fields)
    _check_unknown(data, global_keys | model_keys | {"models"}, "", source)
    if "models" in data:
        stray = [k for k in data if k in model_keys and k not in SHARED_KEYS and k not in global_keys]
        if stray:
            raise ConfigError(f"{source}: {stray[0]}: is a per-model key; with 'models:' set it inside "
                              "each model entry")
        models = data["models"]
        if not isinstance(models, list):
            raise ConfigError(f"{source}: models: must be a list of model entries")
        for i, entry in enumerate(models):
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}: models[{i}]: must be a mapping with at least 'model'")
            _check_unknown(entry, model_keys, f"models[{i}].", source)
        return data, False
    # env stays global (exported by the job script, applied to every instance).
    model_entry = {k: data.pop(k) for k in list(data) if k in model_keys and k not in global_keys}
    if "port_start" in data:
        model_entry["port_start"] = data["port_start"]
    if "name" in data:  # in the single-model form, name names the model (and the job)
        model_entry["name"] = data["name"]
    data["models"] = [model_entry]
    return data, True


def _apply_overrides(data: dict, ov: Overrides, source: str) -> None:
    data.update({k: v for k, v in ov.globals.items() if v is not None})
    per_model = {k: v for k, v in ov.model.items() if v is not None}
    models = data.get("models") or []
    if ov.for_model is not None:
        names = [_entry_name(m) for m in models]
        if ov.for_model not in names and ov.for_model not in [m.get("model") for m in models]:
            raise ConfigError(f"--for-model {ov.for_model}: no such model in {source} "
                              f"(models: {', '.join(names) or 'none'})")
    if not per_model:
        return
    if not models:
        data["models"] = [per_model]
        return
    if ov.for_model is None:
        if len(models) > 1:
            flag = ov.flag_names.get(next(iter(per_model)), "--" + next(iter(per_model)).replace("_", "-"))
            listed = ", ".join(_entry_name(m) for m in models)
            raise ConfigError(f"{flag} applies to one model but {source} has {len(models)} ({listed}): "
                              "add --for-model NAME")
        target = models[0]
    else:
        target = next(m for m in models if ov.for_model in (_entry_name(m), m.get("model")))
    target.update(per_model)


def _entry_name(entry: dict) -> str:
    if isinstance(entry.get("name"), str):
        return entry["name"]
    return slugify(entry["model"]) if isinstance(entry.get("model"), str) else "?"


def _format_error(err: ErrorDetails, source: str, single: bool, ov: Overrides) -> str:
    loc = list(err["loc"])
    if single and loc[:2] == ["models", 0]:
        loc = loc[2:]
    key = loc[-1] if loc else None
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    where = ".".join(parts)
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "is required" + (" (give --model or set 'model' in the config)" if key == "model" else "")
    elif err["type"] in ("greater_than", "greater_than_equal", "less_than_equal"):
        msg = f"{msg[0].lower()}{msg[1:]} (got {err.get('input')!r})"
    elif err["type"].endswith("_type") or err["type"].startswith("int_"):
        msg = f"{msg[0].lower()}{msg[1:]} (got {err.get('input')!r})"
    flag = ov.flag_names.get(key) if key in {**ov.globals, **ov.model} else None
    if flag and ({**ov.globals, **ov.model}.get(key) is not None):
        return f"{flag}: {msg}"
    if not where:
        return f"{source}: {msg}"
    return f"{source}: {where}: {msg}"


def resolve(raw: dict | None, source: str = "<command line>", overrides: Overrides | None = None,
            site_defaults: dict | None = None) -> Config:
    """Validate and merge: CLI overrides > `raw` (the config file) > site defaults > built-ins."""
    ov = overrides or Overrides()
    data, single = normalise(raw or {}, source)
    for key, value in (site_defaults or {}).items():
        data.setdefault(key, value)
    _apply_overrides(data, ov, source)
    if not data.get("models"):
        raise ConfigError(f"{source}: no model given: set 'model' (or 'models:') in the config, "
                          "or pass --model")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        raise ConfigError(_format_error(errors[0], source, single, ov)) from None
    _check_token_file(cfg, source)
    return cfg


def _check_token_file(cfg: Config, source: str) -> None:
    if not cfg.hf_token_file:
        return
    path = Path(os.path.expanduser(cfg.hf_token_file))
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{source}: hf_token_file: {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{source}: hf_token_file: {path} is readable by others "
                          f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")


def site_of(raw: dict | None, overrides: Overrides | None) -> str | None:
    """The site the user asked for (flag first, then the config), or None."""
    ov = overrides or Overrides()
    if ov.globals.get("site"):
        return ov.globals["site"]
    site = (raw or {}).get("site")
    return site if isinstance(site, str) else None


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML (always the `models:` form)."""
    return yaml.safe_dump(cfg.dump(), sort_keys=False, default_flow_style=False)
