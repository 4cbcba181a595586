"""The login-node commands: plan, submit, sites, modulefile."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click
import yaml

from aegis._version import __version__
from aegis.config import Config, Overrides, dump_yaml, load_yaml, resolve, site_of
from aegis.errors import ConfigError, UsageError
from aegis.fsutil import atomic_write
from aegis.placement import Plan, format_table, make_plan
from aegis.schedulers.base import RenderContext, get_scheduler
from aegis.sites import Site, all_sites, choose_site, load_site, save_site

# CLI flag -> (config key, per-model?)
GLOBAL_FLAGS = {
    "site": "--site", "walltime": "--walltime", "account": "--account", "queue": "--queue",
    "filesystems": "--filesystems", "nodes": "--nodes", "hf_home": "--hf-home",
    "name": "--job-name", "runs_dir": "--runs-dir",
}
MODEL_FLAGS = {
    "model": "--model", "instances": "--instances", "tensor_parallel_size": "--tensor-parallel-size",
    "pipeline_parallel_size": "--pipeline-parallel-size", "port_start": "--port-start",
    "model_source": "--model-source", "extra_vllm_args": "--extra-vllm-args",
}


def config_options(func):
    """The flags shared by every command that reads a config (CLI > config > site > built-in)."""
    opts = [
        click.argument("args", nargs=-1, metavar="[CONFIG] [-- ENGINE_ARGS...]"),
        click.option("--site", help="Site profile (default: the config's, else detected, else local)."),
        click.option("--site-file", multiple=True, type=click.Path(dir_okay=False),
                     help="Extra site profile file(s) (also: AEGIS_SITE_PATH)."),
        click.option("--nodes", type=click.IntRange(min=1), help="Nodes to request/allocation size."),
        click.option("--walltime", help="Job walltime, HH:MM:SS."),
        click.option("--account", help="Project/account to charge."),
        click.option("--queue", "--partition", "queue", help="Queue (PBS) or partition (Slurm)."),
        click.option("--filesystems", help="PBS filesystems, e.g. flare:home."),
        click.option("--hf-home", help="HF_HOME for the engines."),
        click.option("--job-name", help="Job name."),
        click.option("--runs-dir", help="Where run directories are created (default: runs)."),
        click.option("--model", help="Model id or path (per model)."),
        click.option("--instances", type=int, help="Instances of the model (per model)."),
        click.option("--tensor-parallel-size", "--tp", "tensor_parallel_size", type=int,
                     help="Tensor-parallel size (per model)."),
        click.option("--pipeline-parallel-size", "--pp", "pipeline_parallel_size", type=int,
                     help="Pipeline-parallel size (per model)."),
        click.option("--port-start", type=int, help="First port of the model (per model)."),
        click.option("--model-source", help="Directory the weights are staged from (per model)."),
        click.option("--extra-args", "--extra-vllm-args", "extra_vllm_args",
                     help="Extra engine arguments as one string, appended to the config's (per model); "
                     "or give them after `--`."),
        click.option("--for-model", help="With several models: the one (by name) the per-model flags change."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


@dataclass
class Resolved:
    """A config resolved against a site, and its plan."""

    config: Config
    site: Site
    plan: Plan
    source: Optional[str]


def resolve_from_cli(kw: dict) -> Resolved:
    """Load the config named on the command line and apply the flags (pops the shared options)."""
    args = list(kw.pop("args", ()))
    config_path = None
    if args and not args[0].startswith("-"):
        config_path = args.pop(0)
    engine_args = args
    ov = Overrides(for_model=kw.pop("for_model", None))
    for key, flag in GLOBAL_FLAGS.items():
        ov.globals[key] = kw.pop(key, None)
        ov.flag_names[key] = flag
    for key, flag in MODEL_FLAGS.items():
        ov.model[key] = kw.pop(key, None)
        ov.flag_names[key] = flag
    extra = []
    if ov.model.get("extra_vllm_args") is not None:
        try:
            extra = shlex.split(ov.model["extra_vllm_args"])
        except ValueError as exc:
            raise ConfigError(f"--extra-vllm-args: cannot split {ov.model['extra_vllm_args']!r}: {exc}") from None
    extra += engine_args
    ov.model["extra_vllm_args"] = extra or None
    site_files = kw.pop("site_file", ())
    raw = load_yaml(config_path) if config_path else {}
    source = config_path or "<command line>"
    site = choose_site(site_of(raw, ov), site_files)
    if ov.model["extra_vllm_args"]:
        field, base = _extra_target(raw, ov)
        ov.model[field] = base + ov.model["extra_vllm_args"]
        if field != "extra_vllm_args":
            ov.model["extra_vllm_args"] = None
            ov.flag_names[field] = "--extra-args"
    cfg = resolve(raw, source, ov, site.defaults)
    if cfg.site is None:
        cfg = cfg.model_copy(update={"site": site.name})
    from aegis.engines import check_engine_site

    for spec in cfg.models:
        check_engine_site(spec, site)  # e.g. TensorRT-LLM on Intel GPUs: refused before submitting
    return Resolved(config=cfg, site=site, plan=make_plan(site, cfg, cfg.nodes), source=config_path)


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
    """Where CLI engine args go (extra_args or extra_vllm_args) and the config's args they follow.

    They come after the config's, so for a repeated flag the command line wins.
    """
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


# --------------------------------------------------------------------------- plan


@click.command("plan")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(as_json, **kw):
    """Show where every instance of CONFIG will run (nodes, devices, CPU cores, ports)."""
    res = resolve_from_cli(kw)
    if as_json:
        click.echo(json.dumps(res.plan.to_dict(), indent=2))
    else:
        click.echo(format_table(res.plan))


# --------------------------------------------------------------------------- submit


def default_run_dir(cfg: Config, now: Optional[_dt.datetime] = None) -> Path:
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(os.path.expanduser(cfg.runs_dir)).absolute() / f"{stamp}-{cfg.job_name}"


def render_job(res: Resolved, run_dir: Path, aegis_command: Optional[str] = None,
               launch_args: tuple = (), payload: Optional[list] = None) -> str:
    ctx = RenderContext(site=res.site, config=res.config, plan=res.plan, run_dir=str(run_dir),
                        config_path=str(run_dir / "config.yaml"), aegis_command=aegis_command,
                        launch_args=["--site-file", str(run_dir / "site.yaml"), *launch_args], payload=payload)
    return get_scheduler(res.site.scheduler).render(ctx)


def submit_resolved(res: Resolved, run_path: Path, script: str) -> str:
    """Create the run directory (config, plan, script), submit, record the job id; returns it."""
    check_paths(res.config)
    if run_path.exists() and any(run_path.iterdir()):
        raise UsageError(f"run directory {run_path} already exists and is not empty; choose another --run-dir")
    run_path.mkdir(parents=True, exist_ok=True)
    atomic_write(run_path / "config.yaml", dump_yaml(res.config))
    save_site(res.site, run_path / "site.yaml")
    atomic_write(run_path / "plan.json", json.dumps(res.plan.to_dict(), indent=2) + "\n")
    script_path = run_path / "job.sh"
    atomic_write(script_path, script, mode=0o755)
    job_id = get_scheduler(res.site.scheduler).submit(str(script_path), str(run_path))
    atomic_write(run_path / "job_id", job_id + "\n")
    return job_id


@click.command("submit")
@config_options
@click.option("--dry-run", is_flag=True, help="Print the job script instead of submitting it.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default: RUNS_DIR/<time>-<name>).")
@click.option("--json", "as_json", is_flag=True, help="Print the submission as JSON.")
@click.option("--wait", is_flag=True, help="Block until the endpoints are ready (exit 0), the job ends "
              "first (exit 3) or --timeout passes (exit 4).")
@click.option("--timeout", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Seconds --wait waits.")
@click.option("--check", is_flag=True, help="Submit a job that only checks the allocation (one step per "
              "node reports its host, devices and local storage) instead of starting engines.")
def submit_cmd(dry_run, run_dir, as_json, wait, timeout, check, **kw):
    """Render the job script for CONFIG and submit it (sbatch, qsub, or locally)."""
    res = resolve_from_cli(kw)
    run_path = Path(run_dir).absolute() if run_dir else default_run_dir(res.config)
    script = render_job(res, run_path, launch_args=("--check",) if check else ())
    if dry_run:
        click.echo(script, nl=False)
        return
    job_id = submit_resolved(res, run_path, script)
    if as_json:
        click.echo(json.dumps({"job_id": job_id, "run_dir": str(run_path), "site": res.site.name}))
    else:
        click.echo(f"submitted job {job_id} on {res.site.name}; run directory: {run_path}")
    if wait:
        from aegis.jobs import wait_for_run
        from aegis.rundir import RunDir

        sys.exit(wait_for_run(RunDir(run_path), res.site, timeout, until_finished=check))


# --------------------------------------------------------------------------- sites


@click.group("sites", invoke_without_command=True)
@click.option("--site-file", multiple=True, type=click.Path(dir_okay=False), help="Extra site profile file(s).")
@click.pass_context
def sites_cmd(ctx, site_file):
    """List the site profiles (shipped, AEGIS_SITE_PATH, --site-file)."""
    ctx.ensure_object(dict)
    ctx.obj["site_files"] = site_file
    if ctx.invoked_subcommand is None:
        rows = [("NAME", "SCHEDULER", "DEVICES/NODE", "SOURCE", "DESCRIPTION")]
        for s in all_sites(site_file):
            rows.append((s.name, s.scheduler, str(s.devices_per_node), s.source, s.description))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            click.echo("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])


@sites_cmd.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def sites_show(ctx, name, as_json):
    """Print one site profile, resolved (inheritance applied, 'auto' filled in)."""
    site = load_site(name, ctx.obj.get("site_files", ())).resolved()
    data = site.model_dump(mode="json")
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)


# --------------------------------------------------------------------------- modulefile


def _lua(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@click.command("modulefile")
@click.option("--bin-dir", type=click.Path(file_okay=False),
              help="Directory holding the `aegis` command to put on PATH (default: this one's).")
@click.option("--site-path", help="AEGIS_SITE_PATH to set (site profile directory of the centre).")
@click.option("--depends", multiple=True, help="Modules to load first (repeatable).")
def modulefile_cmd(bin_dir, site_path, depends):
    """Print an Lmod (Lua) modulefile that puts this aegis on PATH."""
    import jinja2

    from aegis.resources import data_dir

    if bin_dir is None:
        bin_dir = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv[0].endswith("aegis") \
            else sysconfig.get_path("scripts")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["lua"] = _lua
    click.echo(env.get_template("modulefile.lua.j2").render(
        version=__version__, bin_dir=os.path.abspath(bin_dir), site_path=site_path, depends=depends), nl=False)
