"""`aegis launch` (inside an allocation), the per-node `aegis agent`, `shutdown`, `endpoints` and `health`."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import click
import yaml

from aegis.config.flags import config_options, resolve_from_cli
from aegis.config.resolve import check_paths, resolved
from aegis.errors import AegisError
from aegis.launch.endpoints import EndpointsFile
from aegis.run import default_run_dir
from aegis.rundir import LAUNCHED_MARKER, RunDir, claim, find_run_dir


def _python_aegis() -> list[str]:
    return [sys.executable, "-m", "aegis"]


def agent_argv(run_dir: str) -> list[str]:
    """The command the launcher step runs once per node (`aegis plan --commands` shows it too)."""
    return _python_aegis() + ["agent", "--run-dir", run_dir]


@click.command("launch")
@config_options
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Run directory (default: $AEGIS_RUN_DIR, else runs/<time>-<name>).")
@click.option("--check", is_flag=True, help="Only check the allocation: one step per node reports its "
              "host, devices and local storage; exit 0 when every node answered.")
@click.option("--step-timeout", type=float, default=300.0, show_default=True,
              help="Seconds the --check step may take.")
def launch_cmd(run_dir, check, step_timeout, **kw):
    """Start the instances of CONFIG on the nodes of this allocation (batch or interactive)."""
    from aegis.launch.allocation import discover

    kw.pop("nodes", None)  # the allocation decides
    res = resolve_from_cli({**kw, "nodes": None})
    if not check:
        check_paths(res.config)  # before anything is written
    alloc = discover(prefer=res.site.scheduler)
    res = resolved(res.config, res.site, nodes=len(alloc.hosts), source=res.source)
    given = run_dir or os.environ.get("AEGIS_RUN_DIR")
    run = RunDir(Path(given) if given else claim(default_run_dir(res.config)))
    run.path.mkdir(parents=True, exist_ok=True)
    site = res.site.resolved()
    alloc.site = site.name
    alloc.addresses = [site.serve_address.address(h) for h in alloc.hosts]
    alloc.write(run.allocation)
    run.write_inputs(res)  # what the agents read
    agent = agent_argv(str(run.path))
    if check:
        from aegis.launch.check import check_allocation

        check_allocation(run, site, alloc, agent + ["--check"], step_timeout, echo=click.echo,
                         note=lambda m: click.echo(m, err=True))
        return
    from aegis.launch.head import Head

    head = Head(run, site, res.config, res.plan, alloc)
    sys.exit(head.run_all(agent))


@click.command("agent", hidden=True)
@click.option("--run-dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--check", is_flag=True)
def agent_cmd(run_dir, check):
    """Per-node agent (started by `aegis launch`, one per node)."""
    run = RunDir(Path(run_dir))
    if check:
        from aegis.launch.check import report_node

        report_node(run)
        return
    from aegis.launch.agent import run_agent

    sys.exit(run_agent(run))


@click.command("shutdown")
@click.argument("run_dir", required=False, metavar="[RUN_DIR]")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for every instance to stop (0: do not wait).")
def shutdown_cmd(run_dir, timeout):
    """Stop every instance of a run cleanly (the launcher stops its agents, which stop the engines)."""
    from aegis.run import Run

    found = find_run_dir(run_dir, marker=LAUNCHED_MARKER)
    if found is None:
        raise AegisError(f"{run_dir}: give the run directory (shutdown works through its files)")
    Run(found.path).shutdown(timeout)
    click.echo(f"stopped: {found.path}" if timeout > 0 else f"shutdown requested: {found.path}")


@click.command("endpoints")
@click.argument("target", required=False, default=".", metavar="[RUN_DIR|ENDPOINTS_FILE]")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml", "urls", "url"]), default="yaml",
              show_default=True, help="json: the whole file; yaml: model -> list of URLs; urls: one URL per line; "
              "url: the run's gateway (one URL over all instances).")
@click.option("--all", "show_all", is_flag=True, help="Include instances that are not ready.")
def endpoints_cmd(target, fmt, show_all):
    """Print the endpoints of a run."""
    doc = EndpointsFile.read(target)
    if fmt == "json":
        click.echo(json.dumps(doc.to_json(), indent=2))
        return
    if fmt == "url":
        if not doc.gateway:
            raise AegisError(f"{target}: this run has no gateway; set gateway: true in its config, or run "
                             f"aegis gateway {target}")
        click.echo(doc.gateway)
        return
    view = doc.url_view(only_ready=not show_all)
    if fmt == "yaml":
        click.echo(yaml.safe_dump(view, sort_keys=False, default_flow_style=False), nl=False)
    else:
        for urls in view.values():
            for url in urls:
                click.echo(url)


@click.command("health")
@click.argument("target", metavar="ENDPOINTS_FILE|RUN_DIR")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds per endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def health_cmd(target, timeout, as_json):
    """Check every endpoint (GET /health and /v1/models) concurrently; exit 1 unless all are healthy."""
    from aegis.launch.health import probe_all
    from aegis.util.tables import format_table

    doc = EndpointsFile.read(target)
    results = asyncio.run(probe_all(doc.instances, doc.api_key(), timeout=timeout))
    rows = [{"name": inst.name, "model": inst.model, "url": inst.url, "healthy": res.ok,
             "latency_ms": round(res.latency_ms or 0.0, 1) if res.ok else None, "error": res.error}
            for inst, res in zip(doc.instances, results)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(format_table(["INSTANCE", "URL", "STATUS", "LATENCY"], [
            (r["name"], r["url"], "healthy" if r["healthy"] else "DOWN",
             f"{r['latency_ms']:.1f} ms" if r["healthy"] else r["error"]) for r in rows]))
        click.echo(f"{sum(r['healthy'] for r in rows)}/{len(rows)} healthy")
    if not rows or not all(r["healthy"] for r in rows):
        raise SystemExit(1)
