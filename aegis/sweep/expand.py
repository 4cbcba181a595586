"""Expand a sweep spec into resolved configurations with stable short hashes, and render their job scripts."""
from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aegis.config.resolve import resolved
from aegis.config.schema import Config, ModelSpec, Overrides, resolve, slugify
from aegis.config.sites import Site, choose_site
from aegis.engines.options import LoraOptions
from aegis.errors import AegisError, ConfigError
from aegis.plan.placement import Plan
from aegis.rundir import RunDir
from aegis.sweep.spec import SweepSpec, bench_options, probe_options

SWEEP_FILE = "sweep.json"  # the sweep directory's own files; each point's directory is a RunDir
SPEC_COPY = "spec.yaml"
INLINE_JOB = "inline-job"

HASH_LEN = 8
CONFIG_KEYS = (set(Config.model_fields) | set(ModelSpec.model_fields)) - {"models"}
# Short names used in configuration labels; other keys use their words' initials.
ABBREV = {
    "max_num_batched_tokens": "mnbt", "max_num_seqs": "seqs", "kv_cache_dtype": "kv",
    "enable_prefix_caching": "pc", "tensor_parallel_size": "tp", "pipeline_parallel_size": "pp",
    "instances": "inst", "max_loras": "loras", "max_cpu_loras": "cpuloras", "all2all_backend": "a2a",
    "enable_expert_parallel": "ep", "enable_eplb": "eplb", "num_redundant_experts": "redund",
    "gpu_memory_utilization": "gmu", "max_model_len": "len", "max_lora_rank": "rank",
}


@dataclass
class Point:
    """One configuration of the sweep: its settings, resolved config, plan and hash."""

    label: str
    settings: dict  # axis/include key -> value, as written in the spec
    origin: str  # "axes" or "include"
    config: Config
    site: Site
    plan: Plan
    hash: str

    @property
    def dirname(self) -> str:
        return f"{self.label}-{self.hash}"

    @property
    def devices(self) -> int:
        return sum(m.instances * m.devices_per_instance for m in self.config.models)

    def to_dict(self) -> dict:
        return {"hash": self.hash, "label": self.label, "dir": self.dirname, "origin": self.origin,
                "settings": self.settings, "devices": self.devices, "nodes": self.plan.nodes_required,
                "config": self.config.dump()}


# --------------------------------------------------------------------------- axis keys


def axis_target(key: str, base: dict, where: str) -> tuple[str, Any]:
    """Where an axis key goes: ("config", path) for a config key, else ("engine", "--flag").

    `--flag` keys are engine arguments as written; `a.b` is a nested config key; a LoRA
    budget key (max_loras, ...) goes into `lora:` when the base config has one; any other
    key that is not a config key is an engine argument (max_num_seqs -> --max-num-seqs).
    """
    if key.startswith("--"):
        return "engine", key
    if "." in key:
        head = key.split(".", 1)[0]
        if head not in CONFIG_KEYS:
            raise ConfigError(f"{where}: {key!r} is not a config key path (no config key {head!r})")
        return "config", tuple(key.split("."))
    if key in CONFIG_KEYS:
        return "config", (key,)
    if key in LoraOptions.model_fields and isinstance(base.get("lora"), dict):
        return "config", ("lora", key)
    close = difflib.get_close_matches(key, sorted(CONFIG_KEYS), n=1, cutoff=0.85)
    if close:
        raise ConfigError(f"{where}: {key!r} looks like the config key {close[0]!r}; fix the spelling, "
                          f"or write '--{key.replace('_', '-')}' to pass it to the engine as is")
    return "engine", "--" + key.replace("_", "-")


def engine_flag_args(flag: str, value) -> list[str]:
    """An engine argument as command-line words (true -> --flag, false -> --no-flag)."""
    if value is None:
        return []
    if value is True:
        return [flag]
    if value is False:
        return ["--no-" + flag[2:]]
    if isinstance(value, (dict, list)):
        return [flag, json.dumps(value, separators=(",", ":"), sort_keys=True)]
    return [flag, str(value)]


def _without_flag(args: list, flag: str) -> list:
    """args minus every `flag VALUE`, `flag=VALUE` and `--no-flag` occurrence."""
    neg = "--no-" + flag[2:]
    out, i = [], 0
    while i < len(args):
        a = str(args[i])
        if a in (flag, neg):
            i += 1
            if a == flag and i < len(args) and not str(args[i]).startswith("--"):
                i += 1
            continue
        if a.startswith(flag + "="):
            i += 1
            continue
        out.append(args[i])
        i += 1
    return out


def apply_settings(base: dict, settings: dict, where: str) -> dict:
    """The raw config of one point: base + settings (config keys set, engine flags replaced)."""
    raw = copy.deepcopy(base)
    for key, value in settings.items():
        kind, target = axis_target(key, base, where)
        if kind == "config":
            node = raw
            for part in target[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{where}: {key}: {part!r} in the base config is not a mapping")
            node[target[-1]] = copy.deepcopy(value)
        else:
            args_key = "extra_args" if "extra_args" in raw or raw.get("engine", "vllm") != "vllm" \
                else "extra_vllm_args"
            args = raw.get(args_key) or []
            if not isinstance(args, list):
                raise ConfigError(f"{where}: base.{args_key}: must be a list")
            raw[args_key] = _without_flag(args, target) + engine_flag_args(target, value)
    return raw


# --------------------------------------------------------------------------- labels and hashes


def _abbr(key: str) -> str:
    key = key.lstrip("-").replace("-", "_").split(".")[-1]
    return ABBREV.get(key) or "".join(w[0] for w in key.split("_") if w)


def _value_text(value) -> str:
    if value is True:
        return "on"
    if value is False:
        return "off"
    if value is None:
        return "none"
    return slugify(json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value))


def point_label(settings: dict) -> str:
    return slugify("-".join(f"{_abbr(k)}{_value_text(v)}" for k, v in settings.items())) or "base"


def canonical(data) -> str:
    """One text per value: sorted keys, no spaces (the input of every hash)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def short_hash(data) -> str:
    return hashlib.sha256(canonical(data).encode()).hexdigest()[:HASH_LEN]


def config_hash(cfg: Config) -> str:
    """Hash of the resolved configuration's non-default values (new defaulted fields keep old hashes)."""
    return short_hash(cfg.model_dump(mode="json", exclude_defaults=True))


def spec_hash(spec: SweepSpec) -> str:
    """Hash of what runs on each point (bench, probe, warm-up, SLO)."""
    return short_hash(spec.workload())


# --------------------------------------------------------------------------- expansion


def settings_list(spec: SweepSpec) -> list[tuple[str, dict, str | None]]:
    """(origin, settings, name) per point: the axes' cartesian product, then the include entries."""
    out: list[tuple[str, dict, str | None]] = []
    if spec.axes:
        keys = list(spec.axes)
        for values in itertools.product(*(spec.axes[k] for k in keys)):
            out.append(("axes", dict(zip(keys, values)), None))
    for entry in spec.include:
        out.append(("include", dict(entry["set"]), entry["name"]))
    return out


def _resolve(raw: dict, source: str, site: Site) -> tuple[Config, Plan]:
    cfg = resolve(raw, source, Overrides(), site.defaults)
    try:
        done = resolved(cfg, site)  # the same checks and plan as `aegis submit`
    except AegisError as exc:
        raise type(exc)(f"{source}: {exc}") from None
    return done.config, done.plan


def expand(spec: SweepSpec, site_name: str | None = None, site_files=()) -> list[Point]:
    """Every configuration of the sweep, resolved against the site, in spec order."""
    base = dict(spec.base)
    requested = site_name or spec.site or (base.get("site") if isinstance(base.get("site"), str) else None)
    site = choose_site(requested, site_files)
    base["site"] = site.name
    _resolve(base, f"{spec.path}: base", site)  # a broken base is reported once, as the base
    points: list[Point] = []
    seen_hash: dict[str, str] = {}
    seen_label: set[str] = set()
    n_axes = sum(1 for origin, _, _ in settings_list(spec) if origin == "axes")
    for i, (origin, settings, name) in enumerate(settings_list(spec)):
        label = name or point_label(settings)
        where = f"{spec.path}: include[{i - n_axes}] ({label})" if origin == "include" \
            else f"{spec.path}: axes ({label})"
        raw = apply_settings(base, settings, where)
        cfg, plan = _resolve(raw, where, site)
        digest = config_hash(cfg)
        if digest in seen_hash:
            raise ConfigError(f"{where}: is the same configuration as {seen_hash[digest]!r} (hash {digest}); "
                              "drop one of them")
        if label in seen_label:
            label = f"{label}-{i}"
        seen_hash[digest] = label
        seen_label.add(label)
        points.append(Point(label=label, settings=settings, origin=origin, config=cfg, site=site, plan=plan,
                            hash=digest))
    return points


# --------------------------------------------------------------------------- what runs on each point


def command_args(options: dict, params: dict) -> list[str]:
    """`aegis bench`/`probe` flags from a spec section ({input_len: 512} -> ['--input-len', '512'])."""
    out = []
    for name, value in options.items():
        param = params[name]
        long_opt = "--" + name.replace("_", "-")
        if getattr(param, "is_flag", False) and not param.secondary_opts:
            if value:
                out.append(long_opt)
        elif param.secondary_opts and isinstance(value, bool):
            out.append(long_opt if value else max(param.secondary_opts, key=len))
        elif name == "rates":
            out += [long_opt, ",".join(f"{r:g}" for r in value)]
        else:
            out += [long_opt, str(value)]
    return out


def run_steps(spec: SweepSpec) -> list[dict]:
    """The load steps each point runs after its health gate: warm-up, bench, probe (argument lists)."""
    steps = []
    if spec.warmup:
        bench = spec.bench or {}
        warm = {"input_len": spec.warmup.get("input_len", bench.get("input_len", 64)),
                "output_len": spec.warmup.get("output_len", bench.get("output_len", 16)),
                "num_requests": spec.warmup.get("num_requests", 8), "concurrency": 4, "no_tokenize": True}
        steps.append({"step": "warmup", "subdir": "warmup",
                      "args": ["bench", *command_args(warm, bench_options())]})
    if spec.bench is not None:
        steps.append({"step": "bench", "subdir": "bench",
                      "args": ["bench", *command_args(spec.bench, bench_options())]})
    if spec.probe is not None:
        steps.append({"step": "probe", "subdir": "probe",
                      "args": ["probe", *command_args(spec.probe, probe_options())]})
    return steps


def sweep_document(spec: SweepSpec, points: list[Point]) -> dict:
    """The expanded sweep as data (written as sweep.json; read back by aegis report)."""
    return {"name": spec.name, "spec": spec.path, "description": spec.description, "site": points[0].site.name,
            "spec_hash": spec_hash(spec), "slo": spec.slo, "bench": spec.bench, "probe": spec.probe,
            "warmup": spec.warmup, "run": spec.run, "steps": run_steps(spec),
            "points": [p.to_dict() for p in points]}


def write_point(spec: SweepSpec, p: Point, out_dir: Path, payload: list | None = None,
                steps: list | None = None) -> Path:
    """Write one point's run directory: config, site, plan, point.json (with its steps) and job script.

    The job script runs `aegis PAYLOAD` (default `aegis sweep-point DIR`: launch, gate, steps, shutdown).
    """
    from aegis.config.resolve import Resolved
    from aegis.run import render_job
    from aegis.util.fs import atomic_write

    run = RunDir(out_dir.absolute() / p.dirname)
    res = Resolved(config=p.config, site=p.site, plan=p.plan, source=None)
    run.write_inputs(res)
    doc = {**p.to_dict(), "sweep": spec.name, "spec_hash": spec_hash(spec),
           "steps": steps if steps is not None else run_steps(spec), "run": spec.run}
    atomic_write(run.point, json.dumps(doc, indent=2) + "\n")
    run.write_script(render_job(res, run.path, payload=payload or ["sweep-point", str(run.path)]))
    return run.path


def render_points(spec: SweepSpec, points: list[Point], out_dir: Path) -> list[Path]:
    """Write each point's run directory and sweep.json (what `--dry-run --render DIR` shows)."""
    from aegis.util.fs import atomic_write

    out_dir = out_dir.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = run_steps(spec)
    written = [RunDir(write_point(spec, p, out_dir, steps=steps)).script for p in points]
    atomic_write(out_dir / SWEEP_FILE, json.dumps(sweep_document(spec, points), indent=2) + "\n")
    return written
