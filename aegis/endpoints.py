"""The endpoints file (JSON, mode 0600, replaced atomically), its views, and concurrent health checks.

Shape:
    {"job_id": ..., "run_dir": ..., "site": ..., "state": "starting|ready|degraded|stopping|stopped|failed",
     "api_key_file": "<run_dir>/api_key" or null, "updated": <unix time>,
     "instances": [{"name", "model", "url", "host", "hostname", "port", "node", "devices",
                    "status": "starting|ready|unhealthy|restarting|failed|stopped",
                    "pid", "restarts", "ready_seconds", "log", "error"}]}
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Optional

import aiohttp
import click
import yaml

from aegis.errors import AegisError, UsageError
from aegis.fsutil import atomic_write

HEALTH_TIMEOUT = 5.0


def write_endpoints(path: Path, doc: dict) -> None:
    doc = dict(doc, updated=time.time())
    atomic_write(path, json.dumps(doc, indent=2) + "\n", mode=0o600)


def load_endpoints(target: str | os.PathLike) -> tuple[dict, Path]:
    """An endpoints file, or a run directory holding endpoints.json."""
    path = Path(target)
    if path.is_dir():
        path = path / "endpoints.json"
    try:
        return json.loads(path.read_text()), path
    except FileNotFoundError:
        raise UsageError(f"{path}: no endpoints file (has the launcher started?)") from None
    except (json.JSONDecodeError, OSError) as exc:
        raise AegisError(f"{path}: cannot read the endpoints file: {exc}") from None


def read_api_key(doc: dict) -> Optional[str]:
    """The run's key: AEGIS_API_KEY / OPENAI_API_KEY, else the (0600) file the endpoints file names."""
    from aegis.bench.endpoints import Fleet, resolve_api_key

    return resolve_api_key(None, Fleet(endpoints=[], api_key_file=doc.get("api_key_file")))


def url_view(doc: dict, only_ready: bool = True) -> dict[str, list[str]]:
    """model -> [urls]: the view existing benchmark harnesses read."""
    out: dict[str, list[str]] = {}
    for inst in doc.get("instances", []):
        if only_ready and inst.get("status") != "ready":
            continue
        out.setdefault(inst["model"], []).append(inst["url"])
    return out


async def _probe(session: aiohttp.ClientSession, inst: dict, key: Optional[str], served: str) -> dict:
    """GET /health then /v1/models: ready when the model is listed."""
    url = inst["url"]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start = time.monotonic()
    try:
        async with session.get(url + "/health") as resp:
            if resp.status != 200:
                return {"ok": False, "error": f"/health answered {resp.status}"}
        async with session.get(url + "/v1/models", headers=headers) as resp:
            if resp.status != 200:
                return {"ok": False, "error": f"/v1/models answered {resp.status}"}
            body = await resp.json(content_type=None)
        models = [m.get("id") for m in body.get("data", [])]
        if served not in models:
            return {"ok": False, "error": f"serves {models}, not {served!r}", "models": models}
        return {"ok": True, "latency_ms": (time.monotonic() - start) * 1000, "models": models}
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        return {"ok": False, "error": type(exc).__name__ + (f": {exc}" if str(exc) else "")}


async def probe_all(instances: list[dict], key: Optional[str], concurrency: int = 256,
                    timeout: float = HEALTH_TIMEOUT) -> list[dict]:
    """Check every instance concurrently (bounded), in the order given."""
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def one(inst):
            async with sem:
                return await _probe(session, inst, key, inst["model"])
        return await asyncio.gather(*(one(i) for i in instances))


@click.command("endpoints")
@click.argument("target", required=False, default=".", metavar="[RUN_DIR|ENDPOINTS_FILE]")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml", "urls"]), default="yaml", show_default=True,
              help="json: the whole file; yaml: model -> list of URLs; urls: one URL per line.")
@click.option("--all", "show_all", is_flag=True, help="Include instances that are not ready.")
def endpoints_cmd(target, fmt, show_all):
    """Print the endpoints of a run."""
    doc, _ = load_endpoints(target)
    if fmt == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    view = url_view(doc, only_ready=not show_all)
    if fmt == "yaml":
        click.echo(yaml.safe_dump(view, sort_keys=False, default_flow_style=False), nl=False)
    else:
        for urls in view.values():
            for url in urls:
                click.echo(url)


@click.command("health")
@click.argument("target", metavar="ENDPOINTS_FILE|RUN_DIR")
@click.option("--timeout", type=float, default=HEALTH_TIMEOUT, show_default=True, help="Seconds per endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def health_cmd(target, timeout, as_json):
    """Check every endpoint (GET /health and /v1/models) concurrently; exit 1 unless all are healthy."""
    doc, _ = load_endpoints(target)
    instances = doc.get("instances", [])
    results = asyncio.run(probe_all(instances, read_api_key(doc), timeout=timeout))
    rows = []
    for inst, res in zip(instances, results):
        rows.append({"name": inst.get("name"), "model": inst.get("model"), "url": inst.get("url"),
                     "healthy": res["ok"], "latency_ms": round(res.get("latency_ms", 0.0), 1) if res["ok"] else None,
                     "error": res.get("error")})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        width = max([len(str(r["name"])) for r in rows] + [8])
        uwidth = max([len(str(r["url"])) for r in rows] + [3])
        click.echo(f"{'INSTANCE':<{width}}  {'URL':<{uwidth}}  {'STATUS':<9}  LATENCY")
        for r in rows:
            status = "healthy" if r["healthy"] else "DOWN"
            detail = f"{r['latency_ms']:.1f} ms" if r["healthy"] else r["error"]
            click.echo(f"{r['name']:<{width}}  {r['url']:<{uwidth}}  {status:<9}  {detail}")
        ok = sum(r["healthy"] for r in rows)
        click.echo(f"{ok}/{len(rows)} healthy")
    if not rows or not all(r["healthy"] for r in rows):
        raise SystemExit(1)
