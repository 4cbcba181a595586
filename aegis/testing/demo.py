"""`aegis demo`: the whole flow on this machine, from nothing to answered requests.

Sets up what it needs on first use (the CPU build of vLLM in ~/.cache/aegis,
a tiny model generated offline), submits a run with N instances of that
model on the `local` site, waits until every instance is healthy, sends a
few requests to each, prints the endpoints, and shuts the run down (or, with
--keep, leaves it serving: stop it later with `aegis shutdown RUN_DIR`).
"""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import click

from aegis.config.resolve import resolved
from aegis.config.schema import resolve
from aegis.config.sites import load_site
from aegis.errors import AegisError
from aegis.launch.endpoints import EndpointsFile
from aegis.run import Run, submit
from aegis.util.apikey import auth_headers

ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
              "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
ENGINE_ARGS = ["--max-model-len", "512", "--dtype", "bfloat16", "--enforce-eager"]
PROMPTS = ["The cluster said", "Once upon a time", "Tokens per second"]


async def _ask(doc: EndpointsFile, key: str | None, n: int) -> list[tuple[str, str, float]]:
    headers = auth_headers(key)
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for inst in doc.instances:
            for prompt in PROMPTS[:n]:
                t0 = time.monotonic()
                async with session.post(inst.url + "/v1/completions", headers=headers,
                                        json={"model": inst.model, "prompt": prompt, "max_tokens": 8}) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status != 200:
                        raise AegisError(f"{inst.name} answered {resp.status}: {body}")
                out.append((inst.name, prompt + body["choices"][0]["text"], time.monotonic() - t0))
    return out


@click.command("demo")
@click.option("--instances", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--requests", "n_requests", type=click.IntRange(min=1, max=len(PROMPTS)), default=2,
              show_default=True, help="Requests sent to each instance.")
@click.option("--keep", is_flag=True, help="Leave the instances serving (stop with `aegis shutdown RUN_DIR`).")
@click.option("--runs-dir", default="runs", show_default=True)
@click.option("--timeout", type=float, default=1200.0, show_default=True, help="Seconds to wait for health.")
def demo_cmd(instances, n_requests, keep, runs_dir, timeout):
    """Serve a tiny model with real vLLM instances on this machine's CPU cores, query them, shut down."""
    from aegis.testing.cpu_vllm import ensure_tiny_model, ensure_vllm_venv

    click.echo("aegis demo: setting up the CPU build of vLLM and a tiny offline model (first run: minutes)",
               err=True)
    python = ensure_vllm_venv()
    model = ensure_tiny_model(python)
    site = load_site("local")
    cfg = resolve({"site": "local", "model": str(model), "name": "tiny", "instances": instances,
                   "engine_python": str(python), "runs_dir": runs_dir, "startup_timeout": int(timeout),
                   "env": ENGINE_ENV, "extra_vllm_args": ENGINE_ARGS}, "<demo>", site_defaults=site.defaults)
    run = submit(resolved(cfg, site))
    click.echo(f"aegis demo: launched {instances} instance(s) as {run.job_id}; run directory: {run.path}", err=True)
    try:
        doc = run.wait_ready(timeout, echo=click.echo)
        assert doc is not None
        for name, text, secs in asyncio.run(_ask(doc, doc.api_key(), n_requests)):
            click.echo(f"{name}: {json.dumps(text)} ({secs * 1000:.0f} ms)")
        click.echo(f"endpoints ({run.dir.endpoints}):")
        for inst in doc.instances:
            click.echo(f"  {inst.model}: {inst.url}")
    except BaseException:
        _shutdown(run)
        raise
    if keep:
        click.echo(f"serving; the API key is in {run.dir.api_key}; stop with: aegis shutdown {run.path}")
        return
    _shutdown(run)
    click.echo("aegis demo: shut down cleanly")


def _shutdown(run: Run) -> None:
    run.shutdown(timeout=180)
    click.echo(f"stopped: {run.path}")
