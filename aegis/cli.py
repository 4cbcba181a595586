"""The `aegis` command line: one Click group, subcommands loaded lazily.

Errors derived from AegisError become one line on stderr and an exit code
(2 for usage/config errors, 1 for runtime failures); `--debug` shows the
traceback instead.
"""
from __future__ import annotations

import importlib
import logging
import sys

import click

from aegis._version import __version__
from aegis.errors import AegisError

# name -> ("module:attribute", one-line help, or None for a hidden command). Modules are imported only when
# their command runs, so `aegis --help` imports no command module and one area's missing dependency cannot
# break another's.
# tests/core/test_cli.py checks that each help line is the first line of the command's own docstring.
COMMANDS = {
    "plan": ("aegis.plan.cli:plan_cmd",
               "Show where every instance of CONFIG will run (nodes, devices, CPU cores, ports)."),
    "size": ("aegis.plan.cli:size_cmd",
               "Size a fleet for a token budget and deadline, or find the smallest TP that fits a model."),
    "sites": ("aegis.config.cli:sites_cmd",
               "List the site profiles (shipped, AEGIS_SITE_PATH, --site-file)."),
    "modulefile": ("aegis.config.cli:modulefile_cmd",
               "Print an Lmod (Lua) modulefile that puts this aegis on PATH."),
    "submit": ("aegis.schedulers.cli:submit_cmd",
               "Render the job script for CONFIG and submit it (sbatch, qsub, or locally)."),
    "status": ("aegis.schedulers.cli:status_cmd",
               "Show the state of a submitted job, its nodes and its instances (default: the newest run)."),
    "cancel": ("aegis.schedulers.cli:cancel_cmd",
               "Cancel a submitted job (scancel, qdel, or SIGTERM to a local run's process group)."),
    "launch": ("aegis.launch.cli:launch_cmd",
               "Start the instances of CONFIG on the nodes of this allocation (batch or interactive)."),
    "agent": ("aegis.launch.cli:agent_cmd", None),
    "shutdown": ("aegis.launch.cli:shutdown_cmd",
               "Stop every instance of a run cleanly (the launcher stops its agents, which stop the engines)."),
    "endpoints": ("aegis.launch.cli:endpoints_cmd",
               "Print the endpoints of a run."),
    "gateway": ("aegis.gateway.cli:gateway_cmd",
               "One OpenAI URL over the ready instances of RUN_DIRs (several models, runs and jobs), key-checked."),
    "serve": ("aegis.serve.cli:serve_cmd",
               "Serve CONFIG past any walltime: a chain of jobs behind one gateway URL (--status / --stop "
               "SERVICE_DIR)."),
    "drain": ("aegis.gateway.cli:drain_cmd",
               "Send no new requests to INSTANCEs (default: all of the run); wait until their in-flight requests "
               "finish."),
    "health": ("aegis.launch.cli:health_cmd",
               "Check every endpoint (GET /health and /v1/models) concurrently; exit 1 unless all are healthy."),
    "demo": ("aegis.testing.demo:demo_cmd",
               "Serve a tiny model with real vLLM instances on this machine's CPU cores, query them, shut down."),
    "warm": ("aegis.engines.warm:warm_cmd",
               "Send each shared prefix once to every ready instance so the first real requests hit the prefix "
               "cache."),
    "sweep": ("aegis.sweep.cli:sweep_cmd",
               "Run a server-configuration sweep: SPEC.yaml's base config x axes (+ named configurations)."),
    "sweep-point": ("aegis.sweep.cli:sweep_point_cmd", None),
    "report": ("aegis.report.cli:report_cmd",
               "Aggregate RUN_DIRS (bench, probe or sweep directories, searched recursively; vllm bench serve "
               "result files) into a ranked report."),
    "stage": ("aegis.staging.cli:stage_cmd",
               "Copy SRC (a directory or a file) to DEST on every node, once, verified."),
    "bench": ("aegis.bench.cli:bench_cmd",
               "Send load to OpenAI-compatible endpoints and measure it (vLLM's metrics)."),
    "probe": ("aegis.bench.cli:probe_cmd",
               "Find the highest arrival rate the fleet serves well (one run per rate, or a search against an SLO)."),
    "smoke": ("aegis.bench.cli:smoke_cmd",
               "Send one request per endpoint and per LoRA adapter, and check the answers."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use; `--help` lists them from COMMANDS."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx) if COMMANDS.get(name, ("", None))[1]]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in COMMANDS:
            return cmd
        module, _, attr = COMMANDS[name][0].partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(f"'aegis {name}' is not available in this installation ({exc}); "
                                       "reinstall aegis") from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aegis")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--remote", metavar="USER@HOST[:PORT]", help="Run the command on a login node over one SSH "
              "connection (also accepted after the command name); local files named are uploaded.")
@click.pass_context
def cli(ctx, debug, remote):
    """Serve and measure large language models on supercomputers."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    show_warnings(not debug)
    if debug:  # every scheduler and launcher-step call, and the library's progress, on stderr
        logging.basicConfig(level=logging.DEBUG, format="aegis: %(message)s", stream=sys.stderr)
        for noisy in ("asyncio", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


class _WarningLine(logging.Handler):
    """The library's warnings (logger `aegis`), one line each on stderr: `aegis: warning: ...`."""

    def emit(self, record):
        click.echo(f"aegis: warning: {record.getMessage()}", err=True)  # the stderr of the moment


def show_warnings(on: bool) -> None:
    """Print the library's warnings on stderr (off under --debug, whose log shows them already)."""
    logger = logging.getLogger("aegis")
    mine = [h for h in logger.handlers if isinstance(h, _WarningLine)]
    if on and not mine:
        logger.addHandler(_WarningLine(logging.WARNING))
    elif not on:
        for handler in mine:
            logger.removeHandler(handler)


def main(argv=None):
    """Console-script entry point: run the CLI and turn AegisErrors into one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args
    try:
        from aegis.remote import run_remote, split_remote

        target, args = split_remote(args)
        if target is not None:
            sys.exit(run_remote(target, args))
        cli.main(args=args, prog_name="aegis", standalone_mode=False)
    except AegisError as exc:
        if debug:
            raise
        click.echo(f"aegis: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aegis: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("aegis: interrupted", err=True)
        sys.exit(130)
    sys.exit(0)
