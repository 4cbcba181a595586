"""The sweep spec: a base config, axes and named configurations, the bench/probe per point, and an SLO.

Shape (YAML)::

    name: my-study            # optional; default: the spec file's name
    site: h200                # optional; else the base config's, else detected/local
    base: {...}               # an ordinary single-model aegis config
    axes:                     # cartesian product, in the order written
      max_num_seqs: [128, 256]
      kv_cache_dtype: [auto, fp8]
    include:                  # extra named configurations: base + `set`
      - {name: aggressive, set: {max_num_seqs: 1024}}
    bench: {input_len: 1024, output_len: 256, rate: 4, num_requests: 500}   # aegis bench options
    probe: {rates: [1, 2, 4], duration: 60}                                 # and/or aegis probe options
    warmup: {num_requests: 8}
    slo: {max_p95_ttft_ms: 2000, min_success_pct: 99}
    run: {health_timeout: 1800, reset_prefix_cache: true}                  # for the run modes

Every problem is a ConfigError of one line naming the file and the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from aegis.bench import slo
from aegis.config.schema import check_name, load_yaml, slugify, suggest
from aegis.errors import ConfigError

TOP_KEYS = ("name", "description", "site", "base", "axes", "include", "bench", "probe", "warmup", "slo", "run")
# Options of `aegis bench`/`aegis probe` the sweep sets itself for every point.
SWEEP_OWNED = {"endpoints", "url", "api_key_file", "output_dir", "resume", "json", "progress", "label"}
WARMUP_KEYS = ("num_requests", "input_len", "output_len")
RUN_KEYS = ("health_timeout", "reset_prefix_cache", "max_parallel", "shutdown_timeout")
RUN_TYPES = {"health_timeout": "seconds", "shutdown_timeout": "seconds", "max_parallel": "count",
             "reset_prefix_cache": "bool"}
INCLUDE_KEYS = ("name", "set")


@dataclass
class SweepSpec:
    """A validated sweep spec (the base stays raw: each point is resolved by aegis.config.schema)."""

    path: str
    name: str
    site: str | None
    base: dict
    axes: dict[str, list]
    include: list[dict]
    bench: dict | None
    probe: dict | None
    warmup: dict
    slo: dict[str, float]
    run: dict
    description: str = ""
    extra: dict = field(default_factory=dict)

    def workload(self) -> dict:
        """What runs on every point (part of the spec's identity, not of a point's hash)."""
        return {"bench": self.bench, "probe": self.probe, "warmup": self.warmup, "slo": self.slo}


def _fail(path: str, key: str, msg: str) -> NoReturn:
    raise ConfigError(f"{path}: {key}: {msg}")


def _check_name(path: str, key: str, name, what: str) -> None:
    if not isinstance(name, str):
        _fail(path, key, f"must be a string (got {name!r})")
    try:
        check_name(name, what)
    except ValueError as exc:
        _fail(path, key, str(exc))


def _option_names(command) -> dict[str, Any]:
    """option name (`--input-len` -> input_len) -> click parameter, for the options the sweep lets users set."""
    out = {}
    for param in command.params:
        if not getattr(param, "opts", None) or not param.opts[0].startswith("-"):
            continue
        name = max(param.opts, key=len).lstrip("-").replace("-", "_")
        if name not in SWEEP_OWNED:
            out[name] = param
    return out


def bench_options() -> dict:
    from aegis.bench.cli import bench_cmd
    return _option_names(bench_cmd)


def probe_options() -> dict:
    from aegis.bench.cli import probe_cmd
    return _option_names(probe_cmd)


def _check_options(path: str, section: str, data, allowed: dict) -> dict:
    if not isinstance(data, dict):
        _fail(path, section, "must be a mapping of option names to values, e.g. {rate: 4, num_requests: 200}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in SWEEP_OWNED:
            _fail(path, f"{section}.{key}", "is set by the sweep for every point; leave it out")
        if name not in allowed:
            _fail(path, f"{section}.{key}", f"not an option of aegis {section}{suggest(name, allowed)}")
        if isinstance(value, (dict, list)) and name != "rates":
            _fail(path, f"{section}.{key}", "must be a single value")
        if name == "rates":
            value = _rates(path, f"{section}.{key}", value)
        if name == "slo":  # the goodput limits of each run (aegis bench --slo)
            try:
                slo.goodput(slo.parse_limits(str(value), slo.GOODPUT_GRAMMAR))
            except slo.SLOError as exc:
                _fail(path, f"{section}.{key}", str(exc))
        out[name] = value
    return out


def _rates(path: str, key: str, value) -> list[float]:
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        rates = [float(x) for x in items]
    except (TypeError, ValueError):
        _fail(path, key, f"must be a list of arrival rates, e.g. [1, 2, 4] (got {value!r})")
    if not rates or any(r <= 0 for r in rates):
        _fail(path, key, "must list positive arrival rates, e.g. [1, 2, 4]")
    return rates


def _check_slo(path: str, data) -> dict[str, float]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        _fail(path, "slo", "must be a mapping like {max_p95_ttft_ms: 2000, min_success_pct: 99}")
    try:
        return slo.run_level(slo.from_mapping(data))
    except slo.SLOError as exc:
        _fail(path, f"slo.{exc.key}", exc.msg)


def _check_axes(path: str, data) -> dict[str, list]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        _fail(path, "axes", "must be a mapping of key -> list of values, e.g. {max_num_seqs: [128, 256]}")
    out = {}
    for key, values in data.items():
        if not isinstance(key, str) or not key.strip():
            _fail(path, f"axes.{key}", "axis names must be strings")
        if not isinstance(values, list) or not values:
            _fail(path, f"axes.{key}", f"must be a non-empty list of values (got {values!r})")
        seen = []
        for v in values:
            if v in seen:
                _fail(path, f"axes.{key}", f"lists {v!r} twice")
            seen.append(v)
        out[key] = values
    return out


def _check_include(path: str, data) -> list[dict]:
    if data is None:
        return []
    if not isinstance(data, list):
        _fail(path, "include", "must be a list of {name: ..., set: {...}} entries")
    out, names = [], set()
    for i, entry in enumerate(data):
        where = f"include[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            _fail(path, where, "must be a mapping with 'name' and 'set'")
        for key in entry:
            if key not in INCLUDE_KEYS:
                _fail(path, f"{where}.{key}", f"unknown key{suggest(key, INCLUDE_KEYS)}")
        name = entry["name"]
        _check_name(path, f"{where}.name", name, "configuration name")
        if name in names:
            _fail(path, f"{where}.name", f"{name!r} is used twice")
        names.add(name)
        sets = entry.get("set") or {}
        if not isinstance(sets, dict):
            _fail(path, f"{where}.set", "must be a mapping of key -> value")
        out.append({"name": name, "set": dict(sets)})
    return out


def _check_simple(path: str, section: str, data, allowed) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        _fail(path, section, "must be a mapping")
    for key, value in data.items():
        if key not in allowed:
            _fail(path, f"{section}.{key}", f"unknown key{suggest(key, allowed)}")
        if isinstance(value, (dict, list)) or value is None:
            _fail(path, f"{section}.{key}", "must be a single value")
    return dict(data)


def _check_run(path: str, run: dict) -> dict:
    for key, value in run.items():
        kind = RUN_TYPES[key]
        if kind == "bool" and not isinstance(value, bool):
            _fail(path, f"run.{key}", f"must be true or false (got {value!r})")
        if kind == "count" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            _fail(path, f"run.{key}", f"must be a whole number >= 1 (got {value!r})")
        if kind == "seconds" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            _fail(path, f"run.{key}", f"must be a number of seconds > 0 (got {value!r})")
    return run


def parse_spec(data: dict, path: str) -> SweepSpec:
    """Validate a loaded spec mapping."""
    for key in data:
        if key not in TOP_KEYS:
            _fail(path, str(key), f"unknown key{suggest(key, TOP_KEYS)}")
    base = data.get("base")
    if not isinstance(base, dict) or not base:
        _fail(path, "base", "is required: an aegis config (model, instances, tensor_parallel_size, ...)")
    if "models" in base:
        _fail(path, "base.models", "a sweep varies one model; give the model's keys directly under base")
    name = data.get("name", slugify(Path(path).stem))
    _check_name(path, "name", name, "sweep name")
    site = data.get("site")
    if site is not None and not isinstance(site, str):
        _fail(path, "site", "must be a site name, e.g. h200")
    axes = _check_axes(path, data.get("axes"))
    include = _check_include(path, data.get("include"))
    if not axes and not include:
        _fail(path, "axes", "a sweep needs at least one axis or one include entry")
    bench = probe = None
    if data.get("bench") is not None:
        bench = _check_options(path, "bench", data["bench"], bench_options())
    if data.get("probe") is not None:
        probe = _check_options(path, "probe", data["probe"], probe_options())
        if "rates" not in probe:
            _fail(path, "probe.rates", "is required, e.g. [1, 2, 4]")
    if bench is None and probe is None:
        _fail(path, "bench", "say what runs on each configuration: a 'bench' and/or a 'probe' section")
    if bench is not None and "rate" not in bench and "concurrency" not in bench:
        _fail(path, "bench.rate", "give a rate (req/s) or a concurrency")
    if bench is not None and "num_requests" not in bench and "duration" not in bench:
        _fail(path, "bench.num_requests", "give num_requests or duration so each run ends")
    warmup = _check_simple(path, "warmup", data.get("warmup"), WARMUP_KEYS)
    run = _check_run(path, _check_simple(path, "run", data.get("run"), RUN_KEYS))
    description = data.get("description", "")
    if not isinstance(description, str):
        _fail(path, "description", "must be a string")
    return SweepSpec(path=path, name=name, site=site, base=base, axes=axes, include=include, bench=bench,
                     probe=probe, warmup=warmup, slo=_check_slo(path, data.get("slo")), run=run,
                     description=description)


def load_spec(path: str) -> SweepSpec:
    return parse_spec(load_yaml(path, what="sweep spec"), str(path))
