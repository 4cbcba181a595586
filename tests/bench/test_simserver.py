"""The simulated server: continuous batching, prefix cache, LoRA swaps, preemption, auth, truth."""
import asyncio
import os

import aiohttp

from aegis.bench.prom import parse_metrics
from tests.bench.conftest import truth

WORDS = " ".join(f"w{i:03d}" for i in range(64))     # 64 tokens for the simulator's tokenizer


async def post_many(url, bodies, headers=None):
    async with aiohttp.ClientSession() as s:
        async def one(i, body):
            h = {"X-Request-Id": f"r{i}", **(headers or {})}
            async with s.post(url + "/v1/completions", json=body, headers=h) as r:
                return r.status, await r.read()
        return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))


async def post_in_order(url, bodies):
    return [await _one(url, f"s{i}", b) for i, b in enumerate(bodies)]


async def _one(url, rid, body):
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", json=body, headers={"X-Request-Id": rid}) as r:
            return r.status, await r.read()


def test_slots_and_waiting_queue(make_sim):
    s = make_sim("--max-num-seqs", "2", "--decode-ms", "10")
    res = asyncio.run(post_many(s.url, [{"prompt": "a b", "max_tokens": 10}] * 4))
    assert all(status == 200 for status, _ in res)
    t = truth(s.url)
    waits = sorted(v["admitted"] - v["arrival"] for v in t.values())
    assert waits[1] < 0.05 and waits[2] > 0.09   # two ran at once, the others waited ~10 steps
    assert all(v["output_tokens"] == 10 for v in t.values())


def test_prefix_cache_hits_shorten_prefill(make_sim):
    s = make_sim("--prefill-ms-per-token", "2", "--decode-ms", "1", "--block-size", "16")
    body = {"prompt": WORDS, "max_tokens": 2, "stream": True}
    asyncio.run(post_in_order(s.url, [body, body]))
    t = truth(s.url)
    first, second = t["s0"], t["s1"]
    # 3 full blocks of 16 (the last token is recomputed)
    assert first["cached_tokens"] == 0 and second["cached_tokens"] == 48
    assert (second["first_token"] - second["arrival"]) < (first["first_token"] - first["arrival"]) - 0.05
    import urllib.request
    m = parse_metrics(urllib.request.urlopen(s.url + "/metrics").read().decode())
    assert m["prefix_cache_queries_total"] == 128 and m["prefix_cache_hits_total"] == 48


def test_lora_swap_cost_and_adapters_per_batch(make_sim):
    s = make_sim("--lora-modules", "x,y", "--max-loras", "1", "--max-cpu-loras", "1", "--lora-swap-ms", "80",
                 "--decode-ms", "2")
    asyncio.run(post_in_order(s.url, [{"model": "x", "prompt": "hi", "max_tokens": 2, "stream": True},
                                      {"model": "x", "prompt": "hi", "max_tokens": 2, "stream": True},
                                      {"model": "y", "prompt": "hi", "max_tokens": 2, "stream": True}]))
    t = truth(s.url)
    ttft = {k: v["first_token"] - v["arrival"] for k, v in t.items()}
    assert ttft["s0"] > 0.075 and ttft["s1"] < 0.05 and ttft["s2"] > 0.075    # load, resident, swap
    status, body = asyncio.run(_one(s.url, "z", {"model": "nope", "prompt": "hi"}))
    assert status == 404 and b"does not exist" in body


def test_kv_exhaustion_preempts_and_still_finishes(make_sim):
    s = make_sim("--kv-blocks", "12", "--block-size", "4", "--decode-ms", "1")
    res = asyncio.run(post_many(s.url, [{"prompt": "a b c d e f g h", "max_tokens": 24}] * 3))
    assert all(status == 200 for status, _ in res)
    t = truth(s.url)
    assert sum(v["preemptions"] for v in t.values()) > 0
    assert all(v["output_tokens"] == 24 for v in t.values())


def test_api_key_is_required_when_configured(make_sim, tmp_path):
    key = tmp_path / "k"
    key.write_text("s3cret\n")
    os.chmod(key, 0o600)
    s = make_sim("--api-key-file", str(key))
    res = asyncio.run(post_many(s.url, [{"prompt": "a"}]))
    assert res[0][0] == 401
    res = asyncio.run(post_many(s.url, [{"prompt": "a"}], headers={"Authorization": "Bearer s3cret"}))
    assert res[0][0] == 200
