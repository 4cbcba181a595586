"""`aegis smoke`: one short request per endpoint and per LoRA adapter, with the answer checked."""
from __future__ import annotations

import asyncio
import re

import aiohttp

from aegis.bench.client import RequestOptions, send
from aegis.bench.endpoints import Endpoint
from aegis.bench.http import Pool
from aegis.util.tables import format_table


async def _models(session: aiohttp.ClientSession, ep: Endpoint, headers: dict) -> tuple[list[str], list[str]]:
    """(base models, LoRA adapters) that the server lists on /v1/models."""
    try:
        async with session.get(ep.url + "/v1/models", headers=headers) as r:
            if r.status != 200:
                return [], []
            data = (await r.json(content_type=None)).get("data", [])
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return [], []
    base = [m["id"] for m in data if not m.get("parent")]
    adapters = [m["id"] for m in data if m.get("parent")]
    return base, adapters


async def smoke(endpoints: list[Endpoint], headers: dict[str, str], prompt: str = "Hello, my name is",
                max_tokens: int = 8, api: str = "completions", timeout: float = 120.0,
                expect: str | None = None, model: str | None = None) -> list[dict]:
    """One row per (endpoint, model or adapter): status OK / FAIL / SKIPPED and why."""
    opts = RequestOptions(api=api, stream=True, continuous_usage=False, ignore_eos=True, timeout=timeout)
    pattern = re.compile(expect) if expect else None
    rows: list[dict] = []
    pool = Pool(connect_timeout=opts.connect_timeout)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def check(ep: Endpoint, name: str, kind: str) -> dict:
            res = await send(pool, ep.url, opts, name, prompt, max_tokens, headers)
            row = {"endpoint": ep.name, "url": ep.url, "model": name, "kind": kind,
                   "latency_ms": (res["t_end"] - res["t_send"]) * 1e3, "output_tokens": res["output_tokens"],
                   "text": res["text"][:60]}
            problem = res["error"]
            if not problem and res["output_tokens"] < 1:
                problem = "no generated tokens"
            if not problem and res["served_model"] and res["served_model"] != name:
                problem = f"answered as model {res['served_model']!r}"
            if not problem and pattern and not pattern.search(res["text"]):
                problem = f"answer {res['text'][:40]!r} does not match {expect!r}"
            row["status"], row["detail"] = ("FAIL", problem) if problem else ("OK", "")
            return row

        async def one_endpoint(ep: Endpoint) -> list[dict]:
            if ep.status != "ready":
                return [{"endpoint": ep.name, "url": ep.url, "model": ep.model, "kind": "base",
                         "status": "SKIPPED", "detail": f"status {ep.status}", "latency_ms": None,
                         "output_tokens": 0, "text": ""}]
            base, adapters = await _models(session, ep, headers)
            names = [model or ep.model or (base[0] if base else None)]
            if names[0] is None:
                return [{"endpoint": ep.name, "url": ep.url, "model": None, "kind": "base", "status": "FAIL",
                         "detail": "/v1/models lists no model (is the server up? is the API key right?)",
                         "latency_ms": None, "output_tokens": 0, "text": ""}]
            checks = [check(ep, names[0], "base")]
            for a in sorted(set(adapters) | set(ep.lora_adapters)):
                checks.append(check(ep, a, "lora"))
            return list(await asyncio.gather(*checks))

        try:
            for part in await asyncio.gather(*(one_endpoint(e) for e in endpoints)):
                rows.extend(part)
        finally:
            pool.close()
    return rows


def format_rows(rows: list[dict]) -> str:
    table = [(r["endpoint"], str(r["model"]), r["status"],
              f"{r['latency_ms']:.0f}ms" if r.get("latency_ms") is not None else "-", r["output_tokens"],
              r["detail"] or repr(r["text"])) for r in rows]
    return format_table(("Endpoint", "Model", "Status", "Latency", "Tokens", "Detail"), table, right=(3, 4))
