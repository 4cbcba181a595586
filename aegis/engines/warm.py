"""`aegis warm`: send each shared prefix once to every ready instance so later requests hit the prefix cache."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import click

from aegis.errors import AegisError, UsageError
from aegis.launch.endpoints import EndpointsFile, InstanceEndpoint
from aegis.util.apikey import auth_headers
from aegis.util.tables import format_table

SEPARATOR = "---"  # in a plain-text prefix file, a line of only this separates prefixes
PREFIX_KEYS = ("prefix", "text", "prompt")


def _from_item(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in PREFIX_KEYS:
            if isinstance(item.get(key), str):
                return item[key]
    raise UsageError(f"{where}: expected a string or an object with 'prefix', got {json.dumps(item)[:60]}")


def read_prefixes(path: str | Path) -> list[str]:
    """Prefixes from a .json list, a .jsonl file (one string or {"prefix": ...} a line) or plain text.

    Plain text: the prefixes are separated by lines that hold only '---'.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{path}: prefix file not found") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a prefix file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the prefix file: {getattr(exc, 'strerror', None) or exc}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("prefixes"), list):
            data = data["prefixes"]
        if not isinstance(data, list):
            raise UsageError(f"{path}: expected a JSON list of prefixes (or {{\"prefixes\": [...]}})")
        prefixes = [_from_item(item, f"{path}[{i}]") for i, item in enumerate(data)]
    elif path.suffix == ".jsonl":
        prefixes = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                prefixes.append(_from_item(json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{n}: not valid JSON: {exc.msg}") from None
    else:
        chunks: list[str] = []
        current: list[str] = []
        for line in text.splitlines():
            if line.strip() == SEPARATOR:
                chunks.append("\n".join(current))
                current = []
            else:
                current.append(line)
        chunks.append("\n".join(current))
        prefixes = [c.strip("\n") for c in chunks]
    prefixes = [p for p in prefixes if p.strip()]
    if not prefixes:
        raise UsageError(f"{path}: the prefix file has no prefixes")
    return prefixes


async def _send(session: aiohttp.ClientSession, url: str, headers: dict, model: str, prefix: str) -> str | None:
    """One completion of one token for `prefix`; None when it worked, else the error."""
    payload = {"model": model, "prompt": prefix, "max_tokens": 1, "temperature": 0}
    try:
        async with session.post(url + "/v1/completions", json=payload, headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                return f"HTTP {resp.status}: {body[:120].decode(errors='replace')}"
            return None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return type(exc).__name__ + (f": {exc}" if str(exc) else "")


async def warm(instances: list[InstanceEndpoint], prefixes: list[str], key: str | None, *, adapters: bool = False,
               concurrency: int = 64, timeout: float = 300.0) -> list[dict]:
    """Send every prefix to every instance (and, with `adapters`, to each of its LoRA adapters) concurrently."""
    headers = auth_headers(key)
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def one(url, model, prefix):
            async with sem:
                return await _send(session, url, headers, model, prefix)

        async def per_instance(inst):
            models = [inst.model] + (list(inst.lora_adapters) if adapters else [])
            t0 = time.monotonic()
            errors = await asyncio.gather(*(one(inst.url, m, p) for m in models for p in prefixes))
            failed = [e for e in errors if e]
            return {"name": inst.name, "url": inst.url, "models": models, "sent": len(errors),
                    "ok": len(errors) - len(failed), "failed": len(failed),
                    "seconds": round(time.monotonic() - t0, 3), "error": failed[0] if failed else None}

        return list(await asyncio.gather(*(per_instance(i) for i in instances)))


@click.command("warm")
@click.option("--endpoints", "target", required=True, metavar="RUN_DIR|ENDPOINTS_FILE",
              help="The run directory or its endpoints.json.")
@click.option("--prefixes", "prefix_file", required=True, metavar="FILE",
              help="Shared prefixes: a .json list, .jsonl lines, or text separated by '---' lines.")
@click.option("--model", "only_model", default=None, help="Warm only the instances serving this model.")
@click.option("--adapters", is_flag=True, help="Also warm each LoRA adapter the instances list.")
@click.option("--concurrency", type=click.IntRange(1), default=64, show_default=True,
              help="Requests in flight at once, over all instances.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds for the whole warm-up.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-instance report as JSON.")
def warm_cmd(target, prefix_file, only_model, adapters, concurrency, timeout, as_json):
    """Send each shared prefix once to every ready instance so the first real requests hit the prefix cache."""
    prefixes = read_prefixes(prefix_file)
    doc = EndpointsFile.read(target)
    path = target
    instances = doc.instances
    if only_model is not None:
        instances = [i for i in instances if i.model == only_model]
        if not instances:
            raise UsageError(f"--model {only_model}: no instance in {path} serves it")
    ready = [i for i in instances if i.ready]
    skipped = [i for i in instances if not i.ready]
    if not ready:
        raise AegisError(f"{path}: no instance is ready to warm ({len(instances)} listed); "
                         "wait for `aegis health` to pass")
    rows = asyncio.run(warm(ready, prefixes, doc.api_key(), adapters=adapters, concurrency=concurrency,
                            timeout=timeout))
    rows += [{"name": i.name, "url": i.url, "models": [], "sent": 0, "ok": 0, "failed": 0,
              "seconds": 0.0, "error": f"skipped: {i.status.value}"} for i in skipped]
    if as_json:
        click.echo(json.dumps({"prefixes": len(prefixes), "instances": rows}, indent=2))
    else:
        click.echo(format_table(["INSTANCE", "SENT", "OK", "SECONDS", "ERROR"],
                                [(r["name"], r["sent"], r["ok"], f"{r['seconds']:.2f}", r["error"]) for r in rows],
                                right=(1, 2, 3)))
        click.echo(f"warmed {len(prefixes)} prefix(es) on {sum(1 for r in rows if r['sent'] and not r['failed'])}"
                   f"/{len(rows)} instance(s)")
    if any(r["failed"] for r in rows):
        raise SystemExit(1)
