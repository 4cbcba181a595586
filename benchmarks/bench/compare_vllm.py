"""aegis bench vs vLLM's `vllm bench serve`, side by side against one simulated server.

Figures (printed next to each other, with their ratio):
  * sustainable rate: the highest constant request rate (and every lower one
    tried) whose dispatch lag p99 stays under 5 ms with every request answered.
    Dispatch lag is each client's own send timestamp against its schedule:
    aegis records both (`dispatch_lag_ms`); for vLLM its detailed result's
    `start_times` (taken just before `session.post`) against i/rate, aligned on
    the least-delayed request. The lag of arrivals at the server (stamped by
    the simulator, the same estimator for both clients) is printed alongside;
  * TTFT error at 50 req/s: each client's per-request TTFT minus the server's
    true TTFT (first token written - request arrival), matched by request id.

Usage (from the repository root):
  python benchmarks/bench/compare_vllm.py [--rates 50,100,200,400,800] [--duration 3]
      [--vllm-python ~/.cache/aegis/vllm-venv/bin/python] [--tokenizer ~/.cache/aegis/tiny-model]
      [--out benchmarks/bench/results] [--skip-vllm]
The vLLM client needs the CPU vLLM venv (tests/setup.d) and a tokenizer directory
(the tiny model's); without them only aegis's figures are printed.
compare_peers.py uses this file's server set-up, clients, rate ladder and TTFT error with another
criterion (the rate achieved at the server) and more peers (AIPerf, GuideLLM).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from aegis.testing.simserver import SimProcess  # noqa: E402

CACHE = Path(os.environ.get("AEGIS_CACHE", Path.home() / ".cache" / "aegis"))
LAG_LIMIT_MS = 5.0
INPUT_LEN, OUTPUT_LEN = 32, 4
SIM_ARGS = ("--max-num-seqs", "100000", "--kv-blocks", "10000000", "--decode-ms", "10",
            "--prefill-ms-per-token", "0.01", "--decode-ms-per-seq", "0")


class ClientFailed(Exception):
    """A client could not run at some rate; the message is one line."""


def truth(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/sim/truth", timeout=60) as r:
        return json.loads(r.read())


def lag_p99(times: list[float], rate: float, sort: bool = True) -> float:
    """p99 of (t_i - i/rate), shifted so the least-delayed request has lag 0 (ms)."""
    a = np.sort(np.asarray(times)) if sort else np.asarray(times)
    lag = a - np.arange(len(a)) / rate
    return float(np.percentile(lag - lag.min(), 99) * 1e3)


def run_aegis(url: str, rate: float, n: int, out: Path, arrival: str = "constant") -> dict:
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "aegis", "bench", "--url", url, "--model", "sim-model",
                        "--rate", str(rate), "--arrival", arrival, "--num-requests", str(n),
                        "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--no-progress",
                        "--output-dir", str(out), "--timeout", "60"], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        raise ClientFailed(f"aegis bench exited {p.returncode}: {lines[-1] if lines else ''}")
    summary = json.loads((out / "summary.json").read_text())
    run_id = json.loads((out / "config.json").read_text())["run_id"]
    recs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return {"prefix": f"aegis-{run_id}-", "summary": summary, "records": recs, "wall_s": time.monotonic() - t}


class VllmClient:
    """vllm_driver.py in the vLLM venv: imported once, then one benchmark per request."""

    def __init__(self, python: str, tokenizer: str, url: str, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.log = open(out / "driver.log", "w")
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).with_name("vllm_driver.py")), url, tokenizer, str(out), str(INPUT_LEN),
             str(OUTPUT_LEN)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1"))
        self._expect("ready")

    def _expect(self, word: str) -> None:
        line = self.proc.stdout.readline()
        if not line.startswith(word):
            self.close()
            raise ClientFailed(f"vllm bench serve stopped (see {self.out / 'driver.log'})")

    def run(self, rate: float, n: int, burstiness: str, prefix: str) -> dict:
        self.proc.stdin.write(f"{rate:g} {n} {burstiness} {prefix}\n")
        self.proc.stdin.flush()
        self._expect("done")
        return json.loads((self.out / f"{prefix}.json").read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def by_prefix(records: list[dict], prefix: str) -> dict[str, dict]:
    return {t["request_id"]: t for t in records if t["request_id"].startswith(prefix)}


def ttft_errors(client_ms: dict[str, float], t: dict[str, dict]) -> list[float]:
    """Each request's client TTFT (ms, by request id) minus the server's (first token written - arrival)."""
    return [ms - (t[rid]["first_token"] - t[rid]["arrival"]) * 1e3 for rid, ms in client_ms.items()
            if rid in t and ms is not None]


def err_stats(e: list[float]) -> dict | None:
    if not e:
        return None
    x = np.asarray(e)
    return {"n": len(x), "median_ms": float(np.median(x)), "median_abs_ms": float(np.median(np.abs(x))),
            "p90_abs_ms": float(np.percentile(np.abs(x), 90)), "p99_abs_ms": float(np.percentile(np.abs(x), 99))}


def ladder(rates: list[float], duration: float, repeat: int, clients: dict, judge, stop_on_fail: bool = False
           ) -> tuple[dict[str, dict[float, dict]], dict[str, str]]:
    """Each rate in turn, `repeat` trials per client with the clients alternating (trial k of every client
    before trial k + 1 of any); clients[who](rate, n, k) runs one trial of n requests and returns its
    figures, judge(rate, trials) the rate's verdict: a dict with "ok" and a one-line "text". A client that
    raises ClientFailed leaves the ladder (its one-line reason is returned); with stop_on_fail, so does one
    whose rate was not ok. Returns (per client, per rate: the verdict with its trials; per client: why it left)."""
    results: dict[str, dict[float, dict]] = {who: {} for who in clients}
    failed: dict[str, str] = {}
    live = dict(clients)
    for rate in rates:
        n = max(int(rate * duration), 20)
        trials: dict[str, list] = {who: [] for who in live}
        for k in range(repeat):
            for who, trial in list(live.items()):
                try:
                    trials[who].append(trial(rate, n, k))
                except ClientFailed as exc:
                    failed[who] = f"failed at {rate:g} req/s: {exc}"
                    print(f"{who:<8} {rate:>7g} req/s: {failed[who]}", flush=True)
                    del live[who], trials[who]
        for who, ts in trials.items():
            verdict = {**judge(rate, ts), "n": n, "trials": ts}
            results[who][rate] = verdict
            print(f"{who:<8} {rate:>7g} req/s: {verdict['text']}", flush=True)
            if stop_on_fail and not verdict["ok"]:
                del live[who]
        if not live:
            break
    return results, failed


def sustainable(results: dict[float, dict]) -> float | None:
    best = None
    for rate in sorted(results):
        if results[rate]["ok"]:
            best = rate
        else:
            break
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="50,100,200,400,800")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of load per rate")
    ap.add_argument("--ttft-rate", type=float, default=50.0)
    ap.add_argument("--ttft-requests", type=int, default=250)
    ap.add_argument("--vllm-python", default=str(CACHE / "vllm-venv" / "bin" / "python"))
    ap.add_argument("--tokenizer", default=str(CACHE / "tiny-model"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "bench" / "results"))
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="trials per rate and client (the median p99 counts)")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness for this run (both clients and the server inherit it), e.g. -10 on a busy machine")
    a = ap.parse_args()
    if a.nice:
        os.nice(a.nice)
    rates = [float(x) for x in a.rates.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    have_vllm = not a.skip_vllm and Path(a.vllm_python).exists() and Path(a.tokenizer).exists()
    if not have_vllm and not a.skip_vllm:
        print(f"note: no vLLM venv at {a.vllm_python} or tokenizer at {a.tokenizer}: aegis figures only")
    report: dict = {"nice": a.nice, "repeat": a.repeat, "rates": rates, "duration_s": a.duration,
                    "lag_limit_ms": LAG_LIMIT_MS, "input_len": INPUT_LEN, "output_len": OUTPUT_LEN,
                    "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    vllm_err: list[float] = []
    with SimProcess(*SIM_ARGS) as sim:
        try:
            vc = VllmClient(a.vllm_python, a.tokenizer, sim.url, out / "vllm") if have_vllm else None
        except ClientFailed as exc:
            raise SystemExit(f"vllm: {exc}") from None

        def aegis_trial(rate: float, n: int, k: int) -> dict:
            r = run_aegis(sim.url, rate, n, out / f"aegis-rate-{rate:g}-{k}")
            t = by_prefix(truth(sim.url), r["prefix"])
            return {"dispatch_lag_p99_ms": r["summary"]["dispatch_lag_ms"]["p99"],
                    "server_arrival_lag_p99_ms": lag_p99([v["arrival"] for v in t.values()], rate),
                    "answered": len(t) == n and r["summary"]["completed"] == n,
                    "workers": r["summary"]["num_workers"], "client_bound": r["summary"]["client_bound"]}

        def vllm_trial(rate: float, n: int, k: int) -> dict:
            assert vc is not None
            prefix = f"vb-{rate:g}-{k}-"
            res = vc.run(rate, n, "inf", prefix)
            t = by_prefix(truth(sim.url), prefix)
            return {"dispatch_lag_p99_ms": lag_p99(res["start_times"], rate, sort=False),
                    "server_arrival_lag_p99_ms": lag_p99([v["arrival"] for v in t.values()], rate),
                    "answered": len(t) == n and res["completed"] == n}

        def judge(rate: float, trials: list[dict]) -> dict:
            lag = float(np.median([x["dispatch_lag_p99_ms"] for x in trials]))
            slag = float(np.median([x["server_arrival_lag_p99_ms"] for x in trials]))
            ok = all(x["answered"] for x in trials)
            return {"dispatch_lag_p99_ms": lag, "server_arrival_lag_p99_ms": slag, "ok": ok and lag < LAG_LIMIT_MS,
                    "text": f"dispatch lag p99 {lag:8.2f} ms, at the server {slag:8.2f} ms (median of "
                            f"{len(trials)}), {'all' if ok else 'NOT all'} answered"}
        try:
            # 1. dispatch lag per rate: the two clients alternate, each rate tried `repeat` times
            clients = {"aegis": aegis_trial, **({"vllm": vllm_trial} if vc is not None else {})}
            per_rate, failed = ladder(rates, a.duration, a.repeat, clients, judge)
            if failed:
                raise SystemExit("; ".join(f"{who} {why}" for who, why in failed.items()))
            aegis_res, vllm_res = per_rate["aegis"], per_rate.get("vllm", {})
            # 2. TTFT error against the server's truth at 50 req/s (Poisson arrivals)
            r = run_aegis(sim.url, a.ttft_rate, a.ttft_requests, out / "aegis-ttft", arrival="poisson")
            aegis_err = ttft_errors({rec["request_id"]: rec["ttft_ms"] for rec in r["records"] if rec["success"]},
                                    by_prefix(truth(sim.url), r["prefix"]))
            if vc is not None:
                prefix = "vb-ttft-"
                res = vc.run(a.ttft_rate, a.ttft_requests, "1.0", prefix)
                vllm_err = ttft_errors({f"{prefix}{i}": ttft * 1e3 for i, ttft in enumerate(res["ttfts"]) if ttft},
                                       by_prefix(truth(sim.url), prefix))
        finally:
            if vc is not None:
                vc.close()
    report["loadavg_end"] = os.getloadavg()
    report["aegis"] = {"per_rate": aegis_res, "sustainable_rate": sustainable(aegis_res)}
    report["vllm"] = {"per_rate": vllm_res, "sustainable_rate": sustainable(vllm_res)} if have_vllm else None
    report["ttft_error"] = {"rate": a.ttft_rate, "aegis": err_stats(aegis_err), "vllm": err_stats(vllm_err)}
    (out / "compare_vllm.json").write_text(json.dumps(report, indent=2))

    print("\n=== aegis bench vs vllm bench serve (same simulated server, same machine, one run) ===")
    sa, sv = report["aegis"]["sustainable_rate"], (report["vllm"] or {}).get("sustainable_rate")
    ratio = f"{sa / sv:.1f}x" if sa and sv else "n/a"
    print(f"sustainable rate (dispatch lag p99 < {LAG_LIMIT_MS:g} ms): aegis {sa} req/s, vllm {sv} req/s, "
          f"ratio {ratio} (target >= 2x)")
    te = report["ttft_error"]
    for who in ("aegis", "vllm"):
        s = te[who]
        if s:
            print(f"TTFT error vs server truth at {a.ttft_rate:g} req/s, {who:>5}: median {s['median_ms']:.3f} ms, "
                  f"median |err| {s['median_abs_ms']:.3f} ms, p90 |err| {s['p90_abs_ms']:.3f} ms (target <= 1 ms)")
    print(f"load average at start/end: {report['loadavg_start'][0]:.1f} / {report['loadavg_end'][0]:.1f} "
          f"on {os.cpu_count()} CPUs; results in {out}")


if __name__ == "__main__":
    main()
