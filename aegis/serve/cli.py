"""`aegis serve`: serve CONFIG past any walltime behind one gateway URL (a chain of jobs); --status, --stop."""
from __future__ import annotations

import datetime as _dt
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from aegis.config.flags import config_options, resolve_from_cli
from aegis.config.schema import walltime_seconds
from aegis.errors import UsageError
from aegis.serve.chain import Chain, ServiceDir


def parse_until(until: str | None, duration: str | None, now: float | None = None) -> float:
    """The service's end as a unix time: --until 'YYYY-MM-DD HH:MM[:SS]' (local) or --duration 40h/90m/HH:MM:SS."""
    now = time.time() if now is None else now
    if bool(until) == bool(duration):
        raise UsageError("say how long to serve: --until 'YYYY-MM-DD HH:MM' or --duration 40h (one of them)")
    if until:
        try:
            when = _dt.datetime.fromisoformat(until.strip().replace(" ", "T"))
        except ValueError:
            raise UsageError(f"--until {until!r}: not a time; give 'YYYY-MM-DD HH:MM[:SS]' (local time)") from None
        end = when.timestamp()
        if end <= now:
            raise UsageError(f"--until {until!r} is in the past")
        return end
    text = (duration or "").strip().lower()
    try:
        if text[-1:] in ("h", "m", "s", "d") and text[:-1].replace(".", "", 1).isdigit():
            seconds = float(text[:-1]) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[text[-1]]
        else:
            seconds = float(walltime_seconds(text))
    except ValueError:
        raise UsageError(f"--duration {duration!r}: give e.g. 40h, 90m or HH:MM:SS") from None
    if seconds <= 0:
        raise UsageError("--duration must be longer than zero")
    return now + seconds


def status_lines(chain: Chain) -> list[str]:
    """The chain as a user reads it: jobs, handovers, node-hours."""
    from aegis.util.tables import format_table

    def t(x: float | None) -> str:
        return time.strftime("%H:%M:%S", time.localtime(x)) if x else "-"

    out = [f"service: {chain.state}; gateway {chain.gateway or '-'}; until "
           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(chain.until))}; site {chain.site}"]
    rows = [[str(j.index), j.job_id or "-", j.role.value, t(j.submitted), t(j.started), t(j.ready), t(j.ended),
             f"{j.node_hours:.3f}", j.end_reason or j.why] for j in chain.jobs]
    out.append(format_table(["JOB", "ID", "ROLE", "SUBMITTED", "STARTED", "READY", "ENDED", "NODE-H", "NOTE"],
                            rows, right=(0, 7)))
    for h in chain.handovers:
        left = f", {h.old_walltime_left:.0f} s of walltime unused" if h.old_walltime_left is not None else ""
        out.append(f"handover {h.old} -> {h.new} at {t(h.at)}: old job ended {t(h.old_ended)}, overlap "
                   f"{h.overlap_node_hours:.3f} node-hours{left}")
    rate = chain.tokens_per_node_hour()
    out.append(f"node-hours: {chain.node_hours:.3f} in all, {chain.overlap_node_hours:.3f} in overlaps"
               + (f"; {rate:,.0f} generated tokens per node-hour (jobs whose engines were read)" if rate else ""))
    out.extend(f"note: {n}" for n in chain.notes)
    return out


def _service_dir(arg: str | None) -> ServiceDir:
    if arg is None:
        raise UsageError("give the service directory (`aegis serve` printed it)")
    return ServiceDir(Path(arg))


@click.command("serve")
@config_options
@click.option("--until", help="Serve until this local time, 'YYYY-MM-DD HH:MM[:SS]'.")
@click.option("--duration", help="Serve this long: 40h, 90m or HH:MM:SS.")
@click.option("--lead", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="Seconds before a job's walltime ends that its successor is submitted (at least 1.5 x the "
                   "slowest submit-to-ready time seen, + 30 s).")
@click.option("--service-dir", type=click.Path(file_okay=False), default=None,
              help="Where the service keeps its record, jobs and gateway key "
                   "(default: RUNS_DIR/<time>-<name>-service).")
@click.option("--gateway-host", default=None, help="Address the gateway listens on (default: this host's serving "
              "address under the site profile).")
@click.option("--gateway-port", type=click.IntRange(0, 65535), default=8090, show_default=True)
@click.option("--detach", is_flag=True, help="Run in the background; print the service directory and pid.")
@click.option("--status", "show_status", is_flag=True, help="Show the chain of SERVICE_DIR (given as the argument).")
@click.option("--stop", "stop", is_flag=True, help="End the service of SERVICE_DIR cleanly (given as the argument).")
@click.option("--json", "as_json", is_flag=True, help="--status as JSON.")
def serve_cmd(until, duration, lead, service_dir, gateway_host, gateway_port, detach, show_status, stop, as_json,
              **kw):
    """Serve CONFIG past any walltime: a chain of jobs behind one gateway URL (--status / --stop SERVICE_DIR)."""
    if show_status or stop:
        args = list(kw.get("args") or ())
        sdir = _service_dir(service_dir or (args[0] if args else None))
        chain = sdir.read()
        if stop:
            sdir.stop.write_text("")
            click.echo(f"stop requested: {sdir.path}")
            return
        click.echo(chain.model_dump_json(indent=1) if as_json else "\n".join(status_lines(chain)))
        return
    from aegis.serve.service import Service, service_path

    end = parse_until(until, duration)
    res = resolve_from_cli(kw)
    if res.config.gateway:
        raise UsageError("gateway: true starts a gateway per job; aegis serve runs one for the whole chain: "
                         "remove gateway: true")
    sdir = ServiceDir(Path(service_dir).absolute() if service_dir else service_path(res))
    sdir.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    host = gateway_host or res.site.serve_address.address(socket.gethostname())
    if detach:
        argv = [a for a in sys.argv[1:] if a != "--detach"]
        if "--service-dir" not in argv:
            argv += ["--service-dir", str(sdir.path)]
        with open(sdir.log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "aegis", *argv], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=os.getcwd())
        click.echo(f"serving in the background (pid {proc.pid}); service directory: {sdir.path}; "
                   f"log: {sdir.log}")
        return
    click.echo(f"service directory: {sdir.path}")
    svc = Service(res, sdir, end, lead, host, gateway_port, echo=lambda m: click.echo(m, err=True))
    sys.exit(svc.run())
