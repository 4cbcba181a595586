"""The gateway's cost and its prefix-cache gain, against simulated engines on this machine.

    python benchmarks/gateway/bench_gateway.py [--rates 100,500] [--duration 10] [--vllm-router PATH]

1. Overhead: `aegis bench` at each rate straight to two simulated instances (client-side round
   robin: the baseline) and through `aegis gateway` (round_robin), alternating, same seed; p50 and
   p99 TTFT of each and what the gateway adds. With --vllm-router (the vllm-router executable,
   `pip install vllm-router`), the same load through vllm-router too, as a reference data path.
2. Prefix reuse: the shared-prefix workload (32 groups of a 512-token prefix) over 4 instances
   whose KV cache holds only a quarter of the prefixes each (--kv-blocks), through the gateway with
   the cache_aware policy and with round_robin (fresh engines each); the prefix-cache hit rate
   from the engines' own counters (vllm:prefix_cache_hits / vllm:prefix_cache_queries, tokens).
Everything shares this machine's cores (2 here): client, gateway and engines compete.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from aegis.testing.simserver import SimProcess

SIM_ARGS = ["--decode-ms", "4", "--max-num-seqs", "512"]


def endpoints_dir(root: Path, name: str, urls: list[str]) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "endpoints.json").write_text(json.dumps({"version": 1, "state": "ready", "instances": [
        {"name": f"i{k}", "model": "sim-model", "url": u, "status": "ready"} for k, u in enumerate(urls)]}))
    return d


@contextlib.contextmanager
def gateway(run: Path, key_file: Path, policy: str):
    info = run / "gw-info.json"
    info.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "aegis", "gateway", str(run), "--host", "127.0.0.1", "--port", "0",
                             "--key-file", str(key_file), "--policy", policy, "--info", str(info)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not info.exists():
            if proc.poll() is not None:
                raise SystemExit("the gateway did not start")
            time.sleep(0.05)
        yield json.loads(info.read_text())["url"], psutil.Process(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@contextlib.contextmanager
def vllm_router(exe: str, urls: list[str]):
    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
                             "--worker-urls", *urls, "--prometheus-port", str(port + 1)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            time.sleep(0.1)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def bench(urls: list[str], key_file: Path | None, rate: float, duration: float, extra: list[str]) -> dict:
    argv = [sys.executable, "-m", "aegis", "bench", "--model", "sim-model", "--rate", str(rate), "--duration",
            str(duration), "--no-tokenize", "--no-scrape", "--json", "--seed", "1", *extra]
    for u in urls:
        argv += ["--url", u]
    if key_file is not None:
        argv += ["--api-key-file", str(key_file)]
    with tempfile.TemporaryDirectory() as out:
        p = subprocess.run(argv + ["--output-dir", out], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"aegis bench failed: {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout)


def overhead(root: Path, key_file: Path, rates: list[float], duration: float, router: str | None) -> None:
    load = ["--input-len", "64", "--output-len", "4", "--arrival", "poisson"]
    with SimProcess(*SIM_ARGS) as a, SimProcess(*SIM_ARGS) as b:
        urls = [a.url, b.url]
        run = endpoints_dir(root, "two", urls)
        print("Gateway overhead (TTFT ms; client, gateway and 2 simulated engines on this machine's cores)")
        print(f"{'req/s':>6} {'path':<12} {'p50':>8} {'p99':>8} {'+p50':>8} {'+p99':>8} {'failed':>7} "
              f"{'CPU ms/req':>10}")
        with gateway(run, key_file, "round_robin") as (gw_url, gw_proc), \
                (vllm_router(router, urls) if router else contextlib.nullcontext((None, None))) as (vr_url, vr_proc):
            for rate in rates:
                direct = bench(urls, None, rate, duration, load)
                rows = [("direct", direct, None)]
                for name, url, proc, key in (("aegis", gw_url, gw_proc, key_file), ("vllm-router", vr_url, vr_proc,
                                                                                     None)):
                    if url is None:
                        continue
                    cpu0 = sum(proc.cpu_times()[:2])
                    s = bench([url], key, rate, duration, load)
                    rows.append((name, s, 1000 * (sum(proc.cpu_times()[:2]) - cpu0) / max(1, s["completed"])))
                for name, s, cpu in rows:
                    add50 = s["median_ttft_ms"] - direct["median_ttft_ms"]
                    add99 = s["p99_ttft_ms"] - direct["p99_ttft_ms"]
                    print(f"{rate:>6g} {name:<12} {s['median_ttft_ms']:>8.2f} {s['p99_ttft_ms']:>8.2f} "
                          f"{add50:>+8.2f} {add99:>+8.2f} {s['failed']:>7} {'' if cpu is None else f'{cpu:.3f}':>10}")


def prefix_counters(url: str) -> tuple[float, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    get = lambda name: sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))  # noqa
    return get("vllm:prefix_cache_hits_total"), get("vllm:prefix_cache_queries_total")


def prefix_reuse(root: Path, key_file: Path, duration: float) -> None:
    # 32 prefixes x 32 blocks of 16 tokens; 320 blocks per engine hold ~8 prefixes plus the running requests.
    engine = SIM_ARGS + ["--kv-blocks", "320", "--block-size", "16"]
    load = ["--workload", "shared-prefix", "--num-groups", "32", "--prompts-per-group", "16", "--prefix-len", "512",
            "--suffix-len", "32", "--output-len", "8", "--arrival", "poisson"]
    print("\nPrefix reuse (4 engines, 32 shared 512-token prefixes, each engine's cache holds about 8)")
    rates = {}
    for policy in ("round_robin", "cache_aware"):
        with contextlib.ExitStack() as stack:
            sims = [stack.enter_context(SimProcess(*engine)) for _ in range(4)]
            run = endpoints_dir(root, f"four-{policy}", [s.url for s in sims])
            url, _ = stack.enter_context(gateway(run, key_file, policy))
            before = [prefix_counters(s.url) for s in sims]
            s = bench([url], key_file, 40, duration, load)
            after = [prefix_counters(s_.url) for s_ in sims]
            hits = sum(a[0] - b[0] for a, b in zip(after, before))
            queries = sum(a[1] - b[1] for a, b in zip(after, before))
            rates[policy] = hits / queries if queries else 0.0
            print(f"  {policy:<12} hit rate {100 * rates[policy]:5.1f} %  (p50 TTFT {s['median_ttft_ms']:.1f} ms, "
                  f"failed {s['failed']})")
    if rates["round_robin"]:
        print(f"  cache_aware / round_robin: {rates['cache_aware'] / rates['round_robin']:.2f}x (target >= 1.5x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="100,500")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--vllm-router", default=None, help="the vllm-router executable, for a reference data path")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-prefix", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key_file = root / "gateway.key"
        if not a.skip_overhead:
            overhead(root, key_file, [float(x) for x in a.rates.split(",")], a.duration, a.vllm_router)
        if not a.skip_prefix:
            prefix_reuse(root, key_file, a.duration)


if __name__ == "__main__":
    main()
