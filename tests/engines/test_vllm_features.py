"""LoRA swaps and prefix-cache warm-up on ONE real CPU vLLM server started from aegis's own command line."""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess

import pytest
from click.testing import CliRunner

from aegis.config.schema import resolve
from aegis.engines import EngineLaunch, get_engine
from aegis.engines.vllm import metric_name
from aegis.engines.warm import warm_cmd
from tests.fixtures.vllm import (
    BASE_ARGS,
    BASE_ENV,
    START_TIMEOUT,
    VllmServer,
    _wait_healthy,
    free_port,
    stop_vllm_server,
)

pytestmark = pytest.mark.slow
SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega").split()


def samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of `name` in Prometheus text."""
    out = []
    for line in text.splitlines():
        m = SAMPLE_RE.match(line)
        if m and m.group(1) == name:
            out.append((m.group(2) or "", float(m.group(3))))
    return out


def total(text: str, name: str) -> float:
    return sum(v for _, v in samples(text, name))


@pytest.fixture(scope="module")
def server(vllm_env, tmp_path_factory):
    """The tiny model with its 3 adapters (max_loras 1) and prefix caching, argv from aegis's vLLM engine."""
    spec = resolve({"model": str(vllm_env.model_dir), "name": "tiny", "enable_prefix_caching": True,
                    "lora": {"adapters_dir": str(vllm_env.model_dir / "loras"), "max_loras": 1,
                             "max_cpu_loras": 3, "max_lora_rank": 8},
                    "extra_args": list(BASE_ARGS)}).models[0]
    engine = get_engine("vllm")
    opts = spec.engine_options()
    launch = EngineLaunch(model=str(vllm_env.model_dir), served_name=spec.short_name, host="127.0.0.1",
                          port=free_port(), tensor_parallel_size=1, pipeline_parallel_size=1,
                          extra_args=spec.engine_args, python=str(vllm_env.python), options=opts,
                          lora_adapters=opts.lora.resolved(), api_key=True)
    argv = engine.command(launch)
    key = secrets.token_urlsafe(24)
    env = engine.with_paths(dict(os.environ, **BASE_ENV, **engine.feature_env(launch), **engine.key_env(key)), launch)
    log_path = tmp_path_factory.mktemp("engines-vllm") / "vllm.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    srv = VllmServer(url=f"http://127.0.0.1:{launch.port}", api_key=key, model="tiny", python=vllm_env.python,
                     model_dir=vllm_env.model_dir, log_path=log_path, pid=proc.pid, port=launch.port, argv=argv,
                     proc=proc)
    try:
        _wait_healthy(srv, START_TIMEOUT)
        yield srv
    finally:
        stop_vllm_server(srv)


def complete(server, model: str, prompt: str, max_tokens: int = 2) -> dict:
    status, body = server.request("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0, "ignore_eos": True})
    assert status == 200, body[:300]
    return json.loads(body)


def test_lora_adapters_are_swapped_in_and_out(server, vllm_env):
    names = sorted(vllm_env.loras)  # lora-0, lora-1, lora-2: one more than fits (max_loras 1)
    assert len(names) == 3
    argv = server.argv
    assert argv[argv.index("--lora-modules") + 1:argv.index("--lora-modules") + 4] == \
        [f"{n}={vllm_env.loras[n]}" for n in names]
    assert argv[argv.index("--max-loras") + 1] == "1" and "--enable-lora" in argv
    assert server.api_key not in " ".join(argv)
    status, body = server.request("/v1/models")
    assert status == 200
    listed = {m["id"]: m.get("parent") for m in json.loads(body)["data"]}
    assert all(listed.get(n) == "tiny" for n in names), listed

    texts = {}
    for name in names + [names[0]]:  # back to the first one: it must be loaded again
        texts[name] = complete(server, name, "Hello world", max_tokens=6)["choices"][0]["text"]
    base = complete(server, "tiny", "Hello world", max_tokens=6)["choices"][0]["text"]
    assert len(set(texts.values()) | {base}) >= 3, (texts, base)  # the adapters really change the output

    info = samples(server.metrics(), metric_name("lora_requests_info", "0.32.0"))
    running = {}
    for labels, stamp in info:
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        assert lab["max_lora"] == "1"
        if lab["running_lora_adapters"]:
            running[lab["running_lora_adapters"]] = stamp
    # Each adapter ran on its own (one resident at a time), so all three appear as running sets.
    assert set(names) <= set(running), info
    order = sorted(names, key=lambda n: running[n])
    assert order[-1] == names[0], running  # lora-0 ran again last: it was swapped back in


def _words(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)] for i in range(n))


def _window(server, prefix: str, suffixes: list[str]) -> tuple[float, float, float]:
    """Send prefix+suffix for each suffix in turn; (Δhits, Δqueries, hits of the first request)."""
    q, h = metric_name("prefix_cache_queries", "0.32.0"), metric_name("prefix_cache_hits", "0.32.0")
    m0 = server.metrics()
    first_hits = None
    for suffix in suffixes:
        complete(server, "tiny", prefix + " " + suffix)
        if first_hits is None:
            first_hits = total(server.metrics(), h) - total(m0, h)
    m1 = server.metrics()
    return total(m1, h) - total(m0, h), total(m1, q) - total(m0, q), first_hits


def test_warm_up_raises_the_prefix_cache_hit_rate(server, tmp_path):
    suffixes = [_words(100 + i, 8) for i in range(3)]
    cold_prefix, warm_prefix = "Cold: " + _words(1, 85), "Warm: " + _words(2, 85)

    hits, queries, first = _window(server, cold_prefix, suffixes)
    cold_rate = hits / queries
    assert first == 0  # nothing cached before the first request

    # The endpoints file aegis writes, with the key in a 0600 file.
    key_file = tmp_path / "api_key"
    key_file.write_text(server.api_key + "\n")
    key_file.chmod(0o600)
    (tmp_path / "endpoints.json").write_text(json.dumps({"api_key_file": str(key_file), "instances": [
        {"name": "tiny-0", "model": "tiny", "url": server.url, "status": "ready", "lora_adapters": []},
        {"name": "tiny-1", "model": "tiny", "url": "http://127.0.0.1:9", "status": "failed"}]}))
    prefix_file = tmp_path / "prefixes.txt"
    prefix_file.write_text(warm_prefix + "\n---\n")
    result = CliRunner().invoke(warm_cmd, ["--endpoints", str(tmp_path), "--prefixes", str(prefix_file), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {r["name"]: r for r in report["instances"]}
    assert report["prefixes"] == 1 and rows["tiny-0"]["ok"] == rows["tiny-0"]["sent"] == 1
    assert rows["tiny-1"]["sent"] == 0 and "skipped" in rows["tiny-1"]["error"]

    hits, queries, first = _window(server, warm_prefix, suffixes)
    warm_rate = hits / queries
    assert first >= 256  # the very first real request already hits the warmed blocks
    assert warm_rate > cold_rate + 0.15, (cold_rate, warm_rate)
