"""The allocation check (`aegis launch --check`): one agent per node reports its host, devices and storage."""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable

from aegis.config.sites import Site, format_ranges, run_site
from aegis.errors import AegisError
from aegis.launch.allocation import Allocation, node_index
from aegis.launch.steps import per_node_step
from aegis.rundir import RunDir
from aegis.util.fs import atomic_write

log = logging.getLogger("aegis")


def check_allocation(run: RunDir, site: Site, alloc: Allocation, agent_argv: list[str], step_timeout: float,
                     echo: Callable[[str], None], note: Callable[[str], None]) -> None:
    """Run the check step, print each node's report (`echo`), record check.json; AegisError when a node
    did not answer. `note` gets the progress line (the CLI's stderr)."""
    shutil.rmtree(run.nodes, ignore_errors=True)
    run.nodes.mkdir()
    cmd = per_node_step(site, len(alloc.hosts), agent_argv)
    note(f"{alloc.scheduler} allocation {alloc.job_id or '-'}: {len(alloc.hosts)} node(s): {', '.join(alloc.hosts)}")
    log.debug("$ %s", shlex.join(cmd))
    try:
        proc = subprocess.run(cmd, timeout=step_timeout, capture_output=True, text=True)
    except FileNotFoundError:
        raise AegisError(f"{cmd[0]} not found: the site's launcher ({site.launcher}) is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise AegisError(f"the check step did not finish within {step_timeout:.0f} s") from None
    reports = sorted((r for r in map(run.read_json, run.node_checks()) if r), key=lambda r: r["index"])
    for r in reports:
        echo(f"node {r['index']}: {r['host']}  cpus {r['cpus']}  {r['local_storage']} {r['free_gb']:.1f} GB free")
    missing = sorted(set(range(len(alloc.hosts))) - {r["index"] for r in reports})
    atomic_write(run.check, json.dumps(
        {"ok": proc.returncode == 0 and not missing, "hosts": alloc.hosts, "reports": reports}) + "\n")
    if proc.returncode != 0 or missing:
        detail = " ".join((proc.stderr or "").split())[-400:]
        raise AegisError(f"allocation check failed: node(s) {', '.join(alloc.hosts[i] for i in missing) or 'none'}"
                         f" did not report; step exit status {proc.returncode}" + (f": {detail}" if detail else ""))
    echo(f"all {len(alloc.hosts)} node(s) answered")


def report_node(run: RunDir) -> None:
    """The agent's side: write this node's report (host, CPUs it may use, local storage, visible devices)."""
    alloc = Allocation.read(run.allocation)
    index = node_index(alloc.hosts)
    site = run_site(run.path, alloc.site).resolved()
    storage = os.path.expandvars(site.local_storage)
    try:
        free = shutil.disk_usage(storage).free / 1e9
    except OSError:
        free = -1.0
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    report = {"index": index, "host": socket.gethostname(), "pid": os.getpid(), "cpus": format_ranges(cpus),
              "local_storage": storage, "free_gb": free,
              "visible": {k: os.environ.get(k) for k in site.visibility_env}}
    atomic_write(run.node_check(index), json.dumps(report) + "\n")
