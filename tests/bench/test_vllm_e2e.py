"""bench, probe and smoke against the real CPU vLLM server (tiny model, loopback)."""
import json
import urllib.request

import pytest

from tests.bench.conftest import aegis, records
from tests.fixtures.gateway import GatewayProc, call

pytestmark = pytest.mark.slow


def tokenize(server, text):
    status, body = server.request("/tokenize", {"model": server.model, "prompt": text, "add_special_tokens": False})
    assert status == 200, body[:200]
    return json.loads(body)["count"]


def test_bench_completions_against_vllm(vllm_server, tmp_path):
    out = tmp_path / "run"
    before = vllm_server.metrics()
    p = aegis("bench", "--url", vllm_server.url, "--rate", "8", "--num-requests", "8", "--input-len", "40",
              "--output-len", "6", "--no-progress", "--scrape-interval", "0.5", "--output-dir", str(out),
              env={"AEGIS_API_KEY": vllm_server.api_key}, timeout=300)
    assert vllm_server.api_key not in p.stdout + p.stderr
    recs = records(out)
    assert len(recs) == 8 and all(r["success"] for r in recs), [r["error"] for r in recs]
    assert all(r["output_tokens"] == 6 and r["output_tokens_source"] == "usage" for r in recs)
    assert all(r["ttft_ms"] > 0 and r["e2el_ms"] >= r["ttft_ms"] for r in recs)
    # exact prompt lengths, checked independently with the server's tokenizer
    prompts = [json.loads(line)["prompt"] for line in (out / "workload.jsonl").read_text().splitlines()]
    assert [tokenize(vllm_server, t) for t in prompts] == [40] * 8
    assert all(r["prompt_tokens"] in (40, 41) for r in recs)   # 41 with a BOS token
    summ = json.loads((out / "summary.json").read_text())
    assert summ["input_lengths_exact"] and summ["completed"] == 8
    prom = summ["prometheus"]["total"]
    assert prom["scrapes_ok"] >= 2 and prom["generation_tokens_delta"] == 48
    assert "prefix_cache_queries_delta" in prom and "kv_cache_usage_perc_max" in prom
    assert "vllm:" in before
    assert vllm_server.api_key not in (out / "config.json").read_text()


def test_bench_chat_closed_loop_and_probe_against_vllm(vllm_server, tmp_path):
    env = {"AEGIS_API_KEY": vllm_server.api_key}
    out = tmp_path / "chat"
    aegis("bench", "--url", vllm_server.url, "--api", "chat", "--concurrency", "2", "--num-requests", "4",
          "--input-len", "24", "--output-len", "4", "--no-progress", "--output-dir", str(out), env=env, timeout=300)
    recs = records(out)
    assert len(recs) == 4 and all(r["success"] and r["output_tokens"] == 4 for r in recs)
    assert all(r["prompt_tokens"] > 24 for r in recs)        # the chat template adds tokens
    pout = tmp_path / "probe"
    p = aegis("probe", "--url", vllm_server.url, "--rates", "2", "--duration", "2", "--input-len", "16",
              "--output-len", "4", "--no-progress", "--output-dir", str(pout), env=env, timeout=300)
    assert "Highest OK rate" in p.stdout or "No rate was OK" in p.stdout
    row = json.loads((pout / "probe.jsonl").read_text().splitlines()[0])
    assert row["success_pct"] == 100.0


def test_smoke_against_vllm(vllm_server):
    p = aegis("smoke", "--url", vllm_server.url, "--json", env={"AEGIS_API_KEY": vllm_server.api_key}, timeout=300)
    rows = json.loads(p.stdout)
    assert [(r["model"], r["status"]) for r in rows] == [("tiny", "OK")]
    bad = aegis("smoke", "--url", vllm_server.url, check=False, timeout=300)   # no API key
    assert bad.returncode == 1 and "smoke:" in bad.stderr


def test_vllm_metrics_url_is_reachable(vllm_server):
    with urllib.request.urlopen(vllm_server.url + "/metrics", timeout=30) as r:
        assert b"vllm:num_requests_running" in r.read()


def test_lora_smoke_and_bench_against_vllm(vllm_env, vllm_servers, vllm_server, tmp_path):
    loras = dict(sorted(vllm_env.loras.items())[:2])
    server = vllm_servers(args=("--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--lora-modules",
                                *[f"{name}={path}" for name, path in loras.items()]))
    key = tmp_path / "key"
    key.write_text(server.api_key + "\n")
    key.chmod(0o600)
    ep = {"job_id": "1", "run_dir": str(tmp_path), "api_key_file": str(key), "instances": [
        {"name": "tiny-0", "model": server.model, "url": server.url, "status": "ready",
         "lora_adapters": list(loras)}]}
    (tmp_path / "endpoints.json").write_text(json.dumps(ep))
    p = aegis("smoke", "--endpoints", str(tmp_path), "--json", timeout=300)
    rows = json.loads(p.stdout)
    assert sorted((r["model"], r["kind"], r["status"]) for r in rows) == sorted(
        [(server.model, "base", "OK")] + [(name, "lora", "OK") for name in loras])
    out = tmp_path / "run"
    aegis("bench", "--endpoints", str(tmp_path), "--model", server.model, "--lora", "auto", "--lora-mix",
          "round-robin", "--concurrency", "2", "--num-requests", "6", "--input-len", "16", "--output-len", "4",
          "--no-progress", "--scrape-interval", "0.2", "--output-dir", str(out), timeout=300)
    summ = json.loads((out / "summary.json").read_text())
    assert {k: v["completed"] for k, v in summ["per_adapter"].items()} == {name: 3 for name in loras}
    assert summ["prometheus"]["total"]["generation_tokens_delta"] == 24
    # Issue 15: the gateway over this LoRA server and the plain session server (two runs, two keys): a request
    # naming an adapter reaches only the instance that lists it; the base model goes to both.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "key").write_text(vllm_server.api_key + "\n")
    (plain / "key").chmod(0o600)
    (plain / "endpoints.json").write_text(json.dumps({"api_key_file": str(plain / "key"), "instances": [
        {"name": "plain-0", "model": vllm_server.model, "url": vllm_server.url, "status": "ready"}]}))
    assert vllm_server.model == server.model
    gw = GatewayProc(tmp_path, str(tmp_path), str(plain), "--key-file", str(tmp_path / "gw.key"))
    try:
        gkey = (tmp_path / "gw.key").read_text().strip()
        code, models = call(gw.url + "/v1/models", gkey)
        assert {(m["id"], m["parent"], m["instances"]) for m in models["data"]} == {
            (server.model, None, 2), *((name, server.model, 1) for name in loras)}
        for i in range(8):
            for name in (*loras, server.model):
                code, body = call(gw.url + "/v1/completions", gkey, {"model": name, "prompt": f"{i} {name} says",
                                                                     "max_tokens": 2})
                assert code == 200 and body["model"] == name, body
        served = {i["name"]: i["served"] for r in gw.status(gkey)["runs"] for i in r["instances"]}
        assert served["tiny-0"] >= 8 * len(loras) and served["plain-0"] >= 1, served
        assert served["tiny-0"] + served["plain-0"] == 8 * (len(loras) + 1)
    finally:
        gw.stop()
