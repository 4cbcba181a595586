"""`aegis launch` (inside an allocation) and the per-node `aegis agent` it starts with one launcher step.

`aegis launch --check` verifies an allocation: one step runs an agent on every
node, each reports its host, devices and node-local storage, and the head
checks that every node answered.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import click

from aegis.allocation import discover, node_index
from aegis.commands import check_paths, config_options, resolve_from_cli
from aegis.config import dump_yaml
from aegis.errors import AegisError
from aegis.fsutil import atomic_write
from aegis.launchers import per_node_step
from aegis.placement import make_plan
from aegis.sites import run_site, save_site

ALLOCATION = "allocation.json"
NODES_DIR = "nodes"


def _python_aegis() -> list[str]:
    return [sys.executable, "-m", "aegis"]


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
    kw.pop("nodes", None)  # the allocation decides
    res = resolve_from_cli({**kw, "nodes": None})
    if not check:
        check_paths(res.config)  # before anything is written
    alloc = discover(prefer=res.site.scheduler)
    plan = make_plan(res.site, res.config, nodes=len(alloc.hosts))
    run_path = Path(run_dir or os.environ.get("AEGIS_RUN_DIR") or
                    Path(res.config.runs_dir) / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{res.config.job_name}")
    run_path = run_path.absolute()
    run_path.mkdir(parents=True, exist_ok=True)
    site = res.site.resolved()
    doc = {**alloc.to_dict(), "site": site.name,
           "addresses": [site.serve_address.address(h) for h in alloc.hosts]}
    atomic_write(run_path / ALLOCATION, json.dumps(doc, indent=2) + "\n")
    atomic_write(run_path / "plan.json", json.dumps(plan.to_dict(), indent=2) + "\n")
    atomic_write(run_path / "config.yaml", dump_yaml(res.config))  # what the agents read
    if res.site.source != str(run_path / "site.yaml"):  # not already the run's own saved profile
        save_site(res.site, run_path / "site.yaml")
    if not check:
        from aegis.supervise import Head

        head = Head(run_path, site, res.config, plan, alloc)
        sys.exit(head.run(per_node_step(site, len(alloc.hosts),
                                        _python_aegis() + ["agent", "--run-dir", str(run_path)])))
    nodes_dir = run_path / NODES_DIR
    shutil.rmtree(nodes_dir, ignore_errors=True)
    nodes_dir.mkdir()
    cmd = per_node_step(site, len(alloc.hosts),
                        _python_aegis() + ["agent", "--check", "--run-dir", str(run_path)])
    click.echo(f"{alloc.scheduler} allocation {alloc.job_id or '-'}: {len(alloc.hosts)} node(s): "
               f"{', '.join(alloc.hosts)}", err=True)
    try:
        proc = subprocess.run(cmd, timeout=step_timeout, capture_output=True, text=True)
    except FileNotFoundError:
        raise AegisError(f"{cmd[0]} not found: the site's launcher ({site.launcher}) is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise AegisError(f"the check step did not finish within {step_timeout:.0f} s") from None
    reports = sorted((json.loads(p.read_text()) for p in nodes_dir.glob("*.json")), key=lambda r: r["index"])
    for r in reports:
        click.echo(f"node {r['index']}: {r['host']}  cpus {r['cpus']}  "
                   f"{r['local_storage']} {r['free_gb']:.1f} GB free")
    missing = sorted(set(range(len(alloc.hosts))) - {r["index"] for r in reports})
    atomic_write(run_path / "check.json", json.dumps(
        {"ok": proc.returncode == 0 and not missing, "hosts": alloc.hosts, "reports": reports}) + "\n")
    if proc.returncode != 0 or missing:
        detail = " ".join((proc.stderr or "").split())[-400:]
        raise AegisError(f"allocation check failed: node(s) {', '.join(alloc.hosts[i] for i in missing) or 'none'}"
                         f" did not report; step exit status {proc.returncode}" + (f": {detail}" if detail else ""))
    click.echo(f"all {len(alloc.hosts)} node(s) answered")


@click.command("agent", hidden=True)
@click.option("--run-dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--check", is_flag=True)
def agent_cmd(run_dir, check):
    """Per-node agent (started by `aegis launch`, one per node)."""
    run_path = Path(run_dir)
    if not check:
        from aegis.agent import run_agent

        sys.exit(run_agent(run_path))
    alloc = json.loads((run_path / ALLOCATION).read_text())
    index = node_index(alloc["hosts"])
    site = run_site(run_path, alloc["site"]).resolved()
    storage = os.path.expandvars(site.local_storage)
    try:
        free = shutil.disk_usage(storage).free / 1e9
    except OSError:
        free = -1.0
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    from aegis.sites import format_ranges

    report = {"index": index, "host": socket.gethostname(), "pid": os.getpid(), "cpus": format_ranges(cpus),
              "local_storage": storage, "free_gb": free,
              "visible": {k: os.environ.get(k) for k in site.visibility_env}}
    atomic_write(run_path / NODES_DIR / f"{index}.json", json.dumps(report) + "\n")


@click.command("shutdown")
@click.argument("run_dir", required=False, metavar="[RUN_DIR]")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for every instance to stop (0: do not wait).")
def shutdown_cmd(run_dir, timeout):
    """Stop every instance of a run cleanly (the launcher stops its agents, which stop the engines)."""
    import time as _time

    from aegis.rundir import find_run_dir

    run = find_run_dir(run_dir, marker="launch.json")
    if run is None:
        raise AegisError(f"{run_dir}: give the run directory (shutdown works through its files)")
    atomic_write(run.path / "shutdown", f"{_time.time()}\n")
    if timeout <= 0:
        click.echo(f"shutdown requested: {run.path}")
        return
    deadline = _time.monotonic() + timeout
    while _time.monotonic() < deadline:
        doc = run.endpoints() or {}
        if doc.get("state") in ("stopped", "failed") and not _launcher_alive(run.path):
            click.echo(f"stopped: {run.path}")
            return
        _time.sleep(0.5)
    raise AegisError(f"{run.path}: instances still running after {timeout:.0f} s; "
                     f"see {run.path / 'logs'} and try again, or cancel the job")


def _launcher_alive(run_path: Path) -> bool:
    """Whether the head recorded in launch.json still runs (only checkable from its own host)."""
    try:
        info = json.loads((run_path / "launch.json").read_text())
    except (OSError, ValueError):
        return False
    if info.get("host") != socket.gethostname():
        return False
    import psutil

    try:
        proc = psutil.Process(info["pid"])
        return proc.create_time() == info["create_time"] and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
