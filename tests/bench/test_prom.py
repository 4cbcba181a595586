"""Prometheus parsing (vLLM names, older names, several engines, LoRA info) and scraping the simulator."""
import asyncio
import time

import aiohttp
import pytest

from aegis.bench.prom import Scraper, combine, parse_metrics

NEW = """# HELP vllm:num_requests_running Running
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
vllm:num_preemptions_total{engine="0",model_name="m"} 7.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 4.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a",waiting_lora_adapters=""} 100.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="c"} 200.0
"""
OLD = """vllm:num_requests_running{model_name="m"} 1.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.75
vllm:gpu_prefix_cache_queries_total{model_name="m"} 10.0
vllm:gpu_prefix_cache_hits_total{model_name="m"} 5.0
"""


def test_new_names_summed_over_engines_kv_averaged_latest_lora_series():
    v = parse_metrics(NEW)
    assert v["running"] == 5 and v["waiting"] == 4
    assert v["kv_cache_usage_perc"] == pytest.approx(0.375)
    assert v["num_preemptions_total"] == 7
    assert v["prefix_cache_queries_total"] == 1000 and v["prefix_cache_hits_total"] == 250
    assert v["lora_running"] == 2 and v["lora_waiting"] == 1
    assert v["lora_running_adapters"] == "a b"


def test_older_metric_names_are_used_when_new_ones_are_missing():
    v = parse_metrics(OLD)
    assert v["kv_cache_usage_perc"] == 0.75 and v["prefix_cache_hits_total"] == 5


def test_replicas_are_summed():
    v = combine([parse_metrics(NEW), parse_metrics(OLD)])
    assert v["running"] == 6
    assert v["kv_cache_usage_perc"] == pytest.approx((0.375 + 0.75) / 2)
    assert v["prefix_cache_queries_total"] == 1010


def test_scraper_against_the_simulator_records_csv_and_hit_rate_delta(make_sim, tmp_path):
    legacy = make_sim("--legacy-metrics", "--block-size", "4")
    new = make_sim("--block-size", "4")

    async def go():
        csv_path = tmp_path / "p.csv"
        sc = Scraper({"old": legacy.url + "/metrics", "new": new.url + "/metrics"}, {}, str(csv_path), 0.1,
                     t0=time.perf_counter())
        stop = asyncio.Event()
        task = asyncio.create_task(sc.run(stop))
        await asyncio.sleep(0.15)
        async with aiohttp.ClientSession() as s:
            for url in (legacy.url, new.url):
                for _ in range(2):   # the same prompt twice: the second is a prefix-cache hit
                    async with s.post(url + "/v1/completions",
                                      json={"prompt": "one two three four five six seven eight", "max_tokens": 2}) as r:
                        assert r.status == 200
                        await r.read()
        await asyncio.sleep(0.15)
        stop.set()
        await task
        return sc.summary(), csv_path.read_text().splitlines()
    summary, lines = asyncio.run(go())
    assert lines[0].startswith("time_s,unix_time,endpoint,ok,running")
    assert any(",ALL," in line for line in lines)
    for name in ("old", "new"):
        s = summary["per_endpoint"][name]
        assert s["scrapes_ok"] >= 3
        assert s["generation_tokens_delta"] == 4
        assert 0 < s["prefix_cache_hit_rate"] < 1
    assert summary["total"]["generation_tokens_delta"] == 8
