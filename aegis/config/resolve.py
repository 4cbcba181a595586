"""Resolve a config against its site profile (CLI flag > config > site default > built-in) into a Resolved plan."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from aegis.config.schema import Config, Overrides, load_yaml, resolve, site_of
from aegis.config.sites import Site, choose_site
from aegis.errors import ConfigError
from aegis.plan.placement import Plan, make_plan


@dataclass
class Resolved:
    """A config resolved against a site, and its plan."""

    config: Config
    site: Site
    plan: Plan
    source: str | None


def resolve_config(config_path: str | None = None, overrides: Overrides | None = None,
                   engine_args: Sequence[str] = (), site_files: Sequence[str] = ()) -> Resolved:
    """Load CONFIG (or nothing), apply the overrides and trailing engine args, pick the site, plan.

    Engine args given on the command line come after the config's, so for a repeated flag the
    command line wins.
    """
    ov = overrides or Overrides()
    raw = load_yaml(config_path) if config_path else {}
    extra = list(ov.model.get("extra_vllm_args") or []) + list(engine_args)
    ov.model["extra_vllm_args"] = extra or None
    site = choose_site(site_of(raw, ov), site_files)
    if extra:
        field, base = _extra_target(raw, ov)
        ov.model[field] = base + extra
        if field != "extra_vllm_args":
            ov.model["extra_vllm_args"] = None
            ov.flag_names[field] = "--extra-args"
    cfg = resolve(raw, config_path or "<command line>", ov, site.defaults)
    return resolved(cfg, site, source=config_path)


def resolved(cfg: Config, site: Site, nodes: int | None = None, source: str | None = None) -> Resolved:
    """A validated config on `site`, checked against it and planned (on `nodes`, default the config's)."""
    from aegis.engines import check_engine_site
    from aegis.plan.model_check import check_models

    if cfg.site is None:
        cfg = cfg.model_copy(update={"site": site.name})
    models = [spec.model_copy(update={"engine_version": site.engine_versions[spec.engine]})
              if spec.engine_version is None and spec.engine in site.engine_versions else spec
              for spec in cfg.models]  # the engine the site provides decides flag spellings
    if models != cfg.models:
        cfg = cfg.model_copy(update={"models": models})
    for spec in cfg.models:
        check_engine_site(spec, site)  # e.g. TensorRT-LLM on Intel GPUs: refused before submitting
    check_models(cfg, site)  # TP and PP against the model's config.json: TP 6 of 64 heads is refused
    plan = make_plan(site, cfg, cfg.nodes if nodes is None else nodes)
    return Resolved(config=cfg, site=site, plan=plan, source=source)


def job_nodes(cfg: Config, plan: Plan) -> int:
    """The nodes a job asks the scheduler for: the config's `nodes`, at least what the plan needs."""
    return max(cfg.nodes or 0, plan.nodes_required)


def check_paths(cfg: Config) -> None:
    """Where the weights come from must exist (checked on the login node before submitting)."""
    for spec in cfg.models:
        if spec.model_source and not os.path.exists(os.path.expanduser(spec.model_source)):
            raise ConfigError(f"model {spec.short_name!r}: model_source {spec.model_source} does not exist; "
                              "fix the path or drop model_source to load the model by id")
        if spec.model.startswith(("/", "~", "./", "../")) and not spec.model_source \
                and not os.path.exists(os.path.expanduser(spec.model)):
            raise ConfigError(f"model {spec.short_name!r}: model path {spec.model} does not exist")
    python = cfg.engine_python
    if python and "/" in python and "$" not in python and not os.access(os.path.expanduser(python), os.X_OK):
        raise ConfigError(f"engine_python {python} is not an executable file; point it at the Python of the "
                          "environment that has the engine (e.g. ~/.cache/aegis/vllm-venv/bin/python)")


def _extra_target(raw: dict, ov: Overrides) -> tuple[str, list]:
    """Where CLI engine args go (extra_args or extra_vllm_args) and the config's args they follow."""
    models = raw.get("models")
    if isinstance(models, list) and models:
        if len(models) > 1 and ov.for_model is None:
            return "extra_vllm_args", []  # resolve() reports the ambiguity
        target = models[0] if ov.for_model is None else next(
            (m for m in models if isinstance(m, dict) and ov.for_model in (m.get("name"), m.get("model"))), {})
        target = target if isinstance(target, dict) else {}
    else:
        target = raw
    engine = ov.model.get("engine") or target.get("engine", "vllm")
    field = "extra_args" if "extra_args" in target or engine != "vllm" else "extra_vllm_args"
    base = target.get(field)
    return field, list(base) if isinstance(base, list) else []
