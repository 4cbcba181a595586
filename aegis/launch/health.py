"""Health probes: is an instance serving its model? (GET /health, then /v1/models must list it), concurrently."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from aegis.launch.endpoints import InstanceEndpoint
from aegis.util.apikey import auth_headers

HEALTH_TIMEOUT = 5.0


@dataclass(frozen=True)
class Probe:
    """The answer of one instance to one health probe."""

    ok: bool
    error: str | None = None
    latency_ms: float | None = None
    models: list[str] = field(default_factory=list)


async def probe(session: aiohttp.ClientSession, url: str, served: str, key: str | None,
                engine: str = "vllm") -> Probe:
    """GET the engine's health path, then its models path: ready when `served` is listed."""
    from aegis.engines import ENGINES, get_engine

    eng = get_engine(engine if engine in ENGINES else "vllm")
    headers = auth_headers(key)
    start = time.monotonic()
    try:
        async with session.get(url + eng.health_path) as resp:
            if resp.status != 200:
                return Probe(False, f"{eng.health_path} answered {resp.status}")
        async with session.get(url + eng.models_path, headers=headers) as resp:
            if resp.status != 200:
                return Probe(False, f"{eng.models_path} answered {resp.status}")
            body = await resp.json(content_type=None)
        models = [m.get("id") for m in body.get("data", [])]
        if served not in models:
            return Probe(False, f"serves {models}, not {served!r}", models=models)
        return Probe(True, latency_ms=(time.monotonic() - start) * 1000, models=models)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        return Probe(False, type(exc).__name__ + (f": {exc}" if str(exc) else ""))


async def probe_all(instances: Sequence[InstanceEndpoint], key: str | None, concurrency: int = 256,
                    timeout: float = HEALTH_TIMEOUT) -> list[Probe]:
    """Check every instance concurrently (at most `concurrency` at a time), in the order given."""
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def one(inst: InstanceEndpoint) -> Probe:
            async with sem:
                return await probe(session, inst.url, inst.model, key, inst.engine)
        return await asyncio.gather(*(one(i) for i in instances))
