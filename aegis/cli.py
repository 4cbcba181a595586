"""The `aegis` command line: one Click group, subcommands loaded lazily.

Errors derived from AegisError become one line on stderr and an exit code
(2 for usage/config errors, 1 for runtime failures); `--debug` shows the
traceback instead.
"""
from __future__ import annotations

import importlib
import sys

import click

from aegis._version import __version__
from aegis.errors import AegisError

# name -> "module:attribute"; modules are imported only when the command runs,
# so `aegis --help` stays fast and one area's imports cannot break another's.
COMMANDS = {
    "plan": "aegis.commands:plan_cmd",
    "submit": "aegis.commands:submit_cmd",
    "sites": "aegis.commands:sites_cmd",
    "modulefile": "aegis.commands:modulefile_cmd",
    "status": "aegis.jobs:status_cmd",
    "cancel": "aegis.jobs:cancel_cmd",
    "launch": "aegis.launch:launch_cmd",
    "agent": "aegis.launch:agent_cmd",
    "shutdown": "aegis.launch:shutdown_cmd",
    "endpoints": "aegis.endpoints:endpoints_cmd",
    "health": "aegis.endpoints:health_cmd",
    "demo": "aegis.demo:demo_cmd",
    "warm": "aegis.warm:warm_cmd",
    "sweep": "aegis.sweep.cli:sweep_cmd",
    "sweep-point": "aegis.sweep.cli:sweep_point_cmd",
    "report": "aegis.report.cli:report_cmd",
    "size": "aegis.size:size_cmd",
    "stage": "aegis.staging.cli:stage_cmd",
    "bench": "aegis.bench.cli:bench_cmd",
    "probe": "aegis.bench.cli:probe_cmd",
    "smoke": "aegis.bench.cli:smoke_cmd",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in COMMANDS:
            return cmd
        module, _, attr = COMMANDS[name].partition(":")
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
