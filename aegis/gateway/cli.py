"""`aegis gateway` (one OpenAI URL over the ready instances of one or more runs) and `aegis drain`."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from pathlib import Path

import click

from aegis.errors import AegisError, UsageError
from aegis.gateway.policy import POLICIES
from aegis.rundir import RunDir
from aegis.util.apikey import read_key_file
from aegis.util.fs import atomic_write
from aegis.util.signals import until_stopped

_ANY = ("0.0.0.0", "::", "")


def gateway_key(key_file: str | None, run_keys: list[str | None]) -> tuple[str, str]:
    """The key clients must send, and where it is: --key-file (created 0600 if missing), else the runs' one key."""
    if key_file:
        path = Path(key_file).expanduser()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, secrets.token_urlsafe(32) + "\n", mode=0o600)
        return read_key_file(str(path)), str(path)
    keys = set(run_keys)
    if len(keys) == 1 and None not in keys:
        return run_keys[0] or "", "the run's api_key file"
    raise UsageError("the runs have different API keys or none: give --key-file PATH for the gateway's own key "
                     "(created, mode 0600, if it does not exist)")


def default_host(run: RunDir) -> str:
    """This host's serving address under the run's site profile (the loopback on the local site)."""
    from aegis.config.schema import load_yaml
    from aegis.config.sites import Site

    try:
        site = Site.model_validate(load_yaml(run.site))
        return site.serve_address.address(socket.gethostname())
    except Exception:  # a hand-written endpoints file has no site: this host's name
        return socket.gethostname()


async def serve_gateway(gw, host: str, port: int, info: Path | None, echo) -> None:
    """Serve until SIGTERM/SIGINT; `info` (if given) gets the URL once listening."""
    from aiohttp import web

    from aegis.util.ports import taken

    who = taken(host, port) if port else None
    if who:
        raise UsageError(f"port {port} on {host} is in use by {who}; choose another with --port")
    runner = web.AppRunner(gw.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --host/--port") \
            from None
    bound = runner.addresses[0][1]
    gw.url = f"http://{host if ':' not in host else '[' + host + ']'}:{bound}"
    if info is not None:
        atomic_write(info, json.dumps({"url": gw.url, "pid": os.getpid(), "host": socket.gethostname()}) + "\n",
                     mode=0o600)
    echo(f"AEGIS GATEWAY READY {gw.url}")
    await until_stopped()
    await runner.cleanup()


@click.command("gateway")
@click.argument("run_dirs", nargs=-1, metavar="RUN_DIR...")
@click.option("--host", default=None, help="Address to listen on (default: this host's serving address under the "
              "first run's site profile; never all interfaces).")
@click.option("--port", type=click.IntRange(0, 65535), default=8090, show_default=True, help="0: any free port.")
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help="The gateway's own key (created, mode 0600, if missing); needed when the runs' keys differ.")
@click.option("--policy", type=click.Choice(POLICIES), default="cache_aware", show_default=True,
              help="cache_aware: prompts that start alike go to one instance (its prefix cache); least_loaded: "
                   "power of two choices; round_robin.")
@click.option("--max-tries", type=click.IntRange(1, 16), default=3, show_default=True,
              help="Instances a request is sent to when the previous one fails before its first byte.")
@click.option("--info", "info", type=click.Path(dir_okay=False), default=None,
              help="Write the gateway's URL and pid here (JSON, mode 0600) once it listens.")
@click.option("--runs-file", type=click.Path(dir_okay=False), default=None,
              help="Follow the runs this JSON file lists ({\"runs\": [RUN_DIR, ...]}), re-read when it changes "
                   "(`aegis serve` keeps it); needs --key-file.")
def gateway_cmd(run_dirs, host, port, key_file, policy, max_tries, info, runs_file):
    """One OpenAI URL over the ready instances of RUN_DIRs (several models, runs and jobs), key-checked."""
    from aegis.gateway.backends import Pool, RunFollower
    from aegis.gateway.server import Gateway

    if not run_dirs and not runs_file:
        raise UsageError("say which runs to serve: RUN_DIR... or --runs-file FILE")
    if runs_file and not key_file:
        raise UsageError("--runs-file needs --key-file (the runs that come and go have keys of their own)")
    followers = [RunFollower(d) for d in run_dirs]
    key, key_where = gateway_key(key_file, [f.key for f in followers])
    if host is None and not followers:
        raise UsageError("give --host: the address to serve on (with --runs-file alone there is no run to take "
                         "it from)")
    host = host if host is not None else default_host(followers[0].run)
    if host in _ANY:
        raise UsageError("the gateway serves on one address, not all interfaces: give --host with this node's "
                         "serving address")
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    gw = Gateway(Pool(followers, runs_file=Path(runs_file) if runs_file else None), key, policy=policy,
                 max_tries=max_tries, echo=say)
    say(f"aegis gateway: {len(followers)} run(s), policy {policy}, key: {key_where}")
    say(gw._summary())
    asyncio.run(serve_gateway(gw, host, port, Path(info) if info else None, lambda msg: click.echo(msg)))


@click.command("drain")
@click.argument("run_dir", metavar="RUN_DIR")
@click.argument("instances", nargs=-1, metavar="[INSTANCE...]")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait until the gateways report the drained instances idle (0: do not wait).")
def drain_cmd(run_dir, instances, timeout):
    """Send no new requests to INSTANCEs (default: all of the run); wait until their in-flight requests finish."""
    from aegis.gateway.backends import write_drain
    from aegis.gateway.server import STATUS_SECONDS, gateway_inflight
    from aegis.launch.endpoints import EndpointsFile

    run = RunDir(Path(run_dir))
    doc = EndpointsFile.read(run.path)
    names = [i.name for i in doc.instances]
    unknown = [x for x in instances if x not in names]
    if unknown:
        raise UsageError(f"{run.path}: no instance {unknown[0]!r}; its instances: {', '.join(names)}")
    since = time.time()
    write_drain(run, list(instances) or None)
    targets = list(instances) or names
    click.echo(f"draining {len(targets)} instance(s) of {run.path}")
    if timeout <= 0:
        return
    deadline = time.monotonic() + timeout
    while True:
        counts, waiting = gateway_inflight(run, since)
        if counts is None:
            click.echo("no gateway follows this run: nothing in flight through one")
            return
        busy = {n: counts.get(n, 0) for n in targets if counts.get(n, 0)}
        if not busy and not waiting:
            click.echo(f"idle: {len(targets)} instance(s) drained, none has a request in flight")
            return
        if time.monotonic() > deadline:
            raise AegisError(f"still busy after {timeout:.0f} s: " + ", ".join(f"{n} ({c} in flight)"
                                                                                for n, c in busy.items()))
        time.sleep(STATUS_SECONDS)
