"""The command-line flags shared by every command that reads a config, turned into Overrides."""
from __future__ import annotations

import shlex

import click

from aegis.config.resolve import Resolved, resolve_config
from aegis.config.schema import Overrides
from aegis.errors import ConfigError

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




def resolve_from_cli(kw: dict) -> Resolved:
    """Load the config named on the command line and apply the flags (pops the shared options)."""
    args = list(kw.pop("args", ()))
    config_path = None
    if args and not args[0].startswith("-"):
        config_path = args.pop(0)
    ov = Overrides(for_model=kw.pop("for_model", None))
    for key, flag in GLOBAL_FLAGS.items():
        ov.globals[key] = kw.pop(key, None)
        ov.flag_names[key] = flag
    for key, flag in MODEL_FLAGS.items():
        ov.model[key] = kw.pop(key, None)
        ov.flag_names[key] = flag
    if ov.model.get("extra_vllm_args") is not None:
        try:
            ov.model["extra_vllm_args"] = shlex.split(ov.model["extra_vllm_args"])
        except ValueError as exc:
            raise ConfigError(f"--extra-vllm-args: cannot split {ov.model['extra_vllm_args']!r}: {exc}") from None
    return resolve_config(config_path, ov, engine_args=args, site_files=kw.pop("site_file", ()))
