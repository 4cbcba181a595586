"""A real CPU vLLM server with the tiny model answers, refuses keyless requests and exports metrics."""
from __future__ import annotations

import json
import os
import random
import re

import pytest

from tests.fixtures.vllm import group_pids

pytestmark = pytest.mark.slow

# Series that aegis (launcher, bench, engines) reads; all exist in vLLM 0.32.
EXPECTED_SERIES = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket", "vllm:request_success_total",
    "vllm:cache_config_info",
)


def counter(metrics_text: str, name: str) -> float:
    """Sum of all samples of `name` (any labels) in a Prometheus text page."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
    values = [float(v) for v in pattern.findall(metrics_text)]
    assert values, f"{name} not in /metrics"
    return sum(values)


def complete(server, prompt: str, max_tokens: int, **extra) -> dict:
    status, body = server.request("/v1/completions", {
        "model": server.model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, **extra})
    assert status == 200, body[:300]
    return json.loads(body)


def test_server_runs_through_the_vllm_console_script(vllm_server):
    # The fixture starts `<venv>/bin/vllm serve` (what `--headless` followers
    # need); it only works with the "vllm" metadata alias aegis writes.
    assert vllm_server.argv[:2] == [str(vllm_server.python.parent / "vllm"), "serve"]
    status, body = vllm_server.request("/version", key=None)
    assert status == 200 and json.loads(body)["version"] == "0.32.0"


def test_models_lists_the_served_model(vllm_server):
    status, body = vllm_server.request("/v1/models")
    assert status == 200, body[:300]
    models = json.loads(body)["data"]
    assert [m["id"] for m in models] == [vllm_server.model]
    assert models[0]["root"] == str(vllm_server.model_dir)
    assert models[0]["max_model_len"] == 512


def test_completion_generates_the_requested_tokens(vllm_server):
    out = complete(vllm_server, "Hello world", 8)
    assert out["usage"]["completion_tokens"] == 8
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["text"]
    # Greedy decoding of a fixed model is deterministic.
    assert complete(vllm_server, "Hello world", 8)["choices"][0]["text"] == out["choices"][0]["text"]


def test_streaming_completion_sends_chunks_then_done(vllm_server):
    status, body = vllm_server.request("/v1/completions", {
        "model": vllm_server.model, "prompt": "Hello world", "max_tokens": 5, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    events = [line[len("data: "):] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len([t for t in texts if t]) >= 2  # tokens arrive in several chunks
    assert chunks[-1]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("path, payload", [
    ("/v1/models", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1}),
])
def test_requests_without_the_right_key_get_401(vllm_server, path, payload):
    assert vllm_server.request(path, payload, key=None)[0] == 401
    assert vllm_server.request(path, payload, key="not-the-key")[0] == 401
    assert vllm_server.request(path, payload)[0] == 200


def test_health_and_metrics_are_not_protected_by_the_key(vllm_server):
    # vLLM 0.32 guards only /v1, /v2, /inference and /cohere: callers of
    # /health and /metrics need no key, and anyone who can connect can read them.
    assert vllm_server.request("/health", key=None)[0] == 200
    assert vllm_server.request("/metrics", key=None)[0] == 200


def test_api_key_is_not_on_any_command_line(vllm_server):
    pids = group_pids(vllm_server.pid)
    assert vllm_server.pid in pids and len(pids) >= 2  # API server + engine core (+ worker)
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            assert vllm_server.api_key.encode() not in fh.read()
    assert "--api-key" not in vllm_server.argv


def test_metrics_expose_the_series_aegis_reads(vllm_server):
    before = vllm_server.metrics()
    for name in EXPECTED_SERIES:
        assert re.search(rf"^{re.escape(name)}[{{ ]", before, re.M), f"{name} missing from /metrics"
    complete(vllm_server, "Count the tokens", 7)
    after = vllm_server.metrics()
    assert counter(after, "vllm:generation_tokens_total") - counter(before, "vllm:generation_tokens_total") == 7
    assert counter(after, "vllm:request_success_total") - counter(before, "vllm:request_success_total") == 1
    assert counter(after, "vllm:num_requests_running") == 0


def test_prefix_cache_hits_show_in_metrics(vllm_server):
    # Prefix caching is on by default on CPU with 128-token blocks: a repeated
    # prompt of more than 256 tokens hits at least two full blocks.
    rng = random.Random(os.getpid())
    prompt = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(100))
    m0 = vllm_server.metrics()
    first = complete(vllm_server, prompt, 1)
    assert first["usage"]["prompt_tokens"] > 256
    m1 = vllm_server.metrics()
    complete(vllm_server, prompt, 1)
    m2 = vllm_server.metrics()
    hits = "vllm:prefix_cache_hits_total"
    queries = "vllm:prefix_cache_queries_total"
    assert counter(m1, hits) - counter(m0, hits) == 0
    assert counter(m1, queries) - counter(m0, queries) == first["usage"]["prompt_tokens"]
    assert counter(m2, hits) - counter(m1, hits) >= 256
