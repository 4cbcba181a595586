"""Metrics with vLLM's definitions and key names, on hand-made records."""
import pytest

from aegis.bench import metrics
from aegis.bench.probe import classify
from aegis.bench.slo import parse_goodput
from aegis.errors import UsageError


def rec(i, ttft, e2el, out, itl=(), ok=True, kind=None, lag=0.1, endpoint="e0", adapter=None, sent=0.0):
    return {"index": i, "segment": 0, "success": ok, "error_kind": kind, "ttft_ms": ttft if ok else None,
            "e2el_ms": e2el, "output_tokens": out, "itl_ms": list(itl), "prompt_tokens": 10,
            "target_prompt_tokens": 10, "tpot_ms": (e2el - ttft) / (out - 1) if ok and out > 1 else None,
            "dispatch_lag_ms": lag, "queue_wait_ms": 0.0, "sent_s": sent, "intended_s": sent,
            "endpoint": endpoint, "adapter": adapter}


def test_vllm_definitions_and_key_names():
    rs = [rec(0, 100.0, 500.0, 5, itl=[100, 100, 100, 100], sent=0.0),
          rec(1, 300.0, 700.0, 3, itl=[200, 200], sent=1.0),
          rec(2, 50.0, 50.0, 1, sent=1.5),
          rec(3, None, 20.0, 0, ok=False, kind="http_500", sent=2.0)]
    s = metrics.compute(rs, duration=2.0)
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 9
    assert s["request_throughput"] == 1.5
    assert s["output_throughput"] == 4.5 and s["total_token_throughput"] == 19.5
    assert s["mean_ttft_ms"] == pytest.approx(150.0) and s["median_ttft_ms"] == 100.0
    # TPOT only over requests with more than one output token: (500-100)/4, (700-300)/2
    assert s["mean_tpot_ms"] == pytest.approx(150.0)
    # ITL pooled over all requests
    assert s["mean_itl_ms"] == pytest.approx(800 / 6)
    assert s["median_e2el_ms"] == 500.0
    for m in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p95", "p99"):
            assert f"{stat}_{m}_ms" in s
    assert s["errors_by_kind"] == {"http_500": 1}
    assert s["request_goodput"] is None
    assert s["max_concurrent_requests"] == 2   # requests 1 (1.0-1.7 s) and 2 (1.5-1.55 s) overlap


def test_goodput_counts_requests_meeting_every_slo():
    rs = [rec(0, 100.0, 500.0, 5), rec(1, 300.0, 700.0, 3), rec(2, 50.0, 50.0, 1)]
    s = metrics.compute(rs, duration=1.0, slo=parse_goodput("ttft=200,tpot=150ms"))
    assert s["request_goodput"] == 2.0   # the second has TTFT 300 > 200; tpot 0 counts for 1 token


def test_duration_is_the_sum_of_segments():
    rs = [rec(0, 10, 1000, 2, sent=0.0), rec(1, 10, 500, 2, sent=3.0)]
    rs[1]["segment"] = 1
    assert metrics.segment_duration(rs) == pytest.approx(1.0 + 3.5)


def test_breakdown_per_endpoint_and_adapter():
    rs = [rec(0, 10, 20, 2, endpoint="a", adapter="x"), rec(1, 30, 40, 2, endpoint="b"),
          rec(2, 50, 60, 2, endpoint="a", adapter="x")]
    by_ep = metrics.breakdown(rs, "endpoint", 1.0, {})
    assert by_ep["a"]["completed"] == 2 and by_ep["b"]["median_ttft_ms"] == 30
    by_ad = metrics.breakdown(rs, "adapter", 1.0, {})
    assert set(by_ad) == {"x", "(base)"}


@pytest.mark.parametrize("text", ["ttft", "foo=1", "ttft=abc", "tpot=-3"])
def test_bad_slo(text):
    with pytest.raises(UsageError):
        parse_goodput(text)


@pytest.mark.parametrize("completed,failed,med,p99,status", [
    (100, 0, 40.0, 120.0, "OK"),
    (100, 0, 40.0, 250.0, "UNSTABLE"),
    (100, 0, 4000.0, 12000.0, "SLOW"),
    (98, 2, 40.0, 50.0, "TOO HIGH"),
    (0, 0, 0.0, 0.0, "TOO HIGH"),
])
def test_probe_status(completed, failed, med, p99, status):
    assert classify({"completed": completed, "failed": failed, "median_ttft_ms": med, "p99_ttft_ms": p99}) == status
