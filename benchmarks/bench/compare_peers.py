"""aegis bench next to the load generators people use instead, against one simulated server on this machine.

Clients: aegis bench; vLLM's `vllm bench serve` (from the CPU vLLM venv, as in compare_vllm.py); NVIDIA AIPerf
(`--aiperf PATH`) and GuideLLM (`--guidellm PATH`), each from its own venv. Every one is asked for the same load:
constant-rate arrivals, random prompts of 32 tokens, 4 streamed output tokens, on /v1/completions. Per client:

  * sustainable rate: the highest offered rate (and every lower one tried) that the client actually delivers:
    the server sees the trial's requests arrive at >= 95 % of the offered rate ((n - 1) / (last arrival - first
    arrival), stamped by the simulator: the same estimator for every client; median of the trials) and every
    request answered. Each rate is tried --repeat times per client, the clients alternating; a client leaves the
    ladder at its first rate that fails. The server's arrival lag p99 at that rate is printed next to it: the
    5 % lets a client fall behind by up to 5 % of a trial's length, so two clients with the same sustainable
    rate can differ there (compare_vllm.py's criterion, dispatch lag p99 under 5 ms, is the strict one);
  * median TTFT added: the client's own TTFT of each request minus the server's truth (first token written -
    request arrival), matched by request id (aegis and vLLM send their own ids, AIPerf its X-Request-ID, GuideLLM
    reports the response id, which the simulator sets to the id it stamped), over the trials at the lowest rate.

Usage (from the repository root):
  .venv/bin/python benchmarks/bench/compare_peers.py [--aiperf PATH] [--guidellm PATH] [--rates 50,100,200,400,800]
      [--duration 2] [--repeat 3] [--skip-vllm] [--out benchmarks/bench/results/peers]
PATH: the peer's executable or the venv that holds it (e.g. .peer-venvs/aiperf). A peer not given, or one that
cannot run, is reported in one line. Server set-up, aegis's and vLLM's clients, the ladder and the TTFT error
come from compare_vllm.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_vllm import (  # noqa: E402
    CACHE,
    INPUT_LEN,
    OUTPUT_LEN,
    REPO,
    SIM_ARGS,
    ClientFailed,
    VllmClient,
    ladder,
    lag_p99,
    run_aegis,
    sustainable,
    truth,
    ttft_errors,
)

from aegis.testing.simserver import SimProcess  # noqa: E402

MODEL = "sim-model"
RATE_TOLERANCE = 0.05     # a rate is delivered when the server sees >= 95 % of it
PEER_TIMEOUT_S = 600


def reset(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url + "/sim/reset", data=b"{}"), timeout=30).read()


def executable(path: str, name: str) -> str:
    """PATH itself, or PATH/bin/NAME when PATH is a venv (any directory)."""
    p = Path(os.path.abspath(Path(path).expanduser()))   # the peers run in their own directories
    if p.is_dir():
        p = p / "bin" / name
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise ClientFailed(f"no {name} executable at {p}")
    return str(p)


def telling_line(text: str) -> str:
    """The line of a peer's output that says why it failed: the last naming an error, else the last."""
    lines = [x.strip().strip("│┃|").strip() for x in text.splitlines()]
    lines = [x for x in lines if x and not set(x) <= set("─━═╭╮╰╯┌┐└┘ ")]
    errs = [x for x in lines if re.search(r"error|exception|failed|reason", x, re.I)]
    return ((errs or lines or ["(no output)"])[-1])[:300]


def run_peer(cmd: list[str], workdir: Path, env: dict[str, str]) -> None:
    """Run one peer benchmark in `workdir` (its output in run.log); ClientFailed with one line if it fails."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    log = workdir / "run.log"
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        try:
            p = subprocess.run(cmd, cwd=workdir, stdout=fh, stderr=subprocess.STDOUT, env=env,
                               timeout=PEER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ClientFailed(f"no result within {PEER_TIMEOUT_S} s (see {log})") from None
        except OSError as exc:
            raise ClientFailed(f"cannot start {cmd[0]}: {exc}") from None
    if p.returncode != 0:
        raise ClientFailed(f"exit {p.returncode}: {telling_line(log.read_text(errors='replace'))} (see {log})")


def peer_env(offline_hub: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AEGIS_API_KEY", "OPENAI_API_KEY", "PYTHONPATH")}
    if offline_hub:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def aiperf(exe: str, url: str, tokenizer: str, workdir: Path, rate: float, n: int) -> tuple[dict, int]:
    """One AIPerf run; (TTFT ms by X-Request-ID, requests answered). AIPerf 0.13 refuses a local tokenizer
    directory under HF_HUB_OFFLINE=1 (it looks the path up as a hub repo id), so the hub is left "online": with
    a directory it reads the files and makes no request."""
    run_peer([exe, "profile", "--model", MODEL, "--url", url, "--endpoint-type", "completions", "--streaming",
              "--tokenizer", tokenizer, "--isl", str(INPUT_LEN), "--osl", str(OUTPUT_LEN),
              "--extra-inputs", "ignore_eos:true", "--request-rate", f"{rate:g}", "--arrival-pattern", "constant",
              "--request-count", str(n), "--random-seed", "0", "--ui", "none", "--artifact-dir", str(workdir)],
             workdir, peer_env(offline_hub=False))
    recs = [json.loads(x) for x in (workdir / "profile_export.jsonl").read_text().splitlines() if x.strip()]
    ttft = {r["metadata"]["x_request_id"]: (r["metrics"].get("time_to_first_token") or {}).get("value")
            for r in recs}
    return ttft, sum(1 for r in recs if not r.get("error") and r["metrics"].get("time_to_first_token"))


def guidellm(exe: str, url: str, tokenizer: str, workdir: Path, rate: float, n: int) -> tuple[dict, int]:
    """One GuideLLM run; (TTFT ms by response id, requests answered)."""
    out = workdir / "benchmarks.json"
    run_peer([exe, "run", "--backend", f"kind=openai_http,target={url},model={MODEL},request_format=/v1/completions",
              "--profile", f"kind=constant,rate={rate:g}", "--constraint", f"kind=max_requests,count={n}",
              "--data", f"kind=synthetic_text,prompt_tokens={INPUT_LEN},output_tokens={OUTPUT_LEN}",
              "--tokenizer", f"kind=huggingface_auto,model={tokenizer}", "--output", f"kind=json,path={out}",
              "--disable-console"], workdir, peer_env(offline_hub=True))
    ok = json.loads(out.read_text())["benchmarks"][0]["requests"]["successful"]
    return {r["response_id"]: r["time_to_first_token_ms"] for r in ok}, len(ok)


def measured(url: str, rate: float, n: int, client_ttft: dict[str, float | None], answered: int) -> dict:
    """A trial's figures from the server's truth of the client's own requests (matched by id)."""
    t = {x["request_id"]: x for x in truth(url)}
    mine = {rid: t[rid] for rid in client_ttft if rid in t}
    arrivals = sorted(v["arrival"] for v in mine.values())
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    return {"achieved_rate": (len(arrivals) - 1) / span if span > 0 else 0.0,
            "server_arrival_lag_p99_ms": lag_p99(arrivals, rate) if arrivals else None,
            "seen": len(mine), "answered": len(mine) == n and answered == n,
            "ttft_added_ms": ttft_errors(client_ttft, mine)}


def judge(rate: float, trials: list[dict]) -> dict:
    achieved = float(np.median([x["achieved_rate"] for x in trials]))
    lags = [x["server_arrival_lag_p99_ms"] for x in trials if x["server_arrival_lag_p99_ms"] is not None]
    lag = float(np.median(lags)) if lags else float("nan")
    answered = all(x["answered"] for x in trials)
    return {"achieved_rate": achieved, "server_arrival_lag_p99_ms": lag,
            "ok": answered and achieved >= (1 - RATE_TOLERANCE) * rate,
            "text": f"the server saw {achieved:8.1f} req/s ({achieved / rate:6.1%}), arrival lag p99 {lag:8.2f} ms "
                    f"(median of {len(trials)}), {'all' if answered else 'NOT all'} answered"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aiperf", help="AIPerf's executable or its venv")
    ap.add_argument("--guidellm", help="GuideLLM's executable or its venv")
    ap.add_argument("--rates", default="50,100,200,400,800")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds of load per trial")
    ap.add_argument("--repeat", type=int, default=3, help="trials per rate and client (the median counts)")
    ap.add_argument("--vllm-python", default=str(CACHE / "vllm-venv" / "bin" / "python"))
    ap.add_argument("--tokenizer", default=str(CACHE / "tiny-model"), help="a tokenizer directory for the peers")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "bench" / "results" / "peers"))
    a = ap.parse_args()
    rates = sorted(float(x) for x in a.rates.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = str(Path(a.tokenizer).expanduser())
    notes: dict[str, str] = {}
    peers: dict[str, str] = {}
    for name, path in (("aiperf", a.aiperf), ("guidellm", a.guidellm)):
        if not path:
            notes[name] = f"not run (give --{name} PATH)"
            continue
        try:
            peers[name] = executable(path, name)
        except ClientFailed as exc:
            notes[name] = f"not run: {exc}"
    if peers and not Path(tokenizer).is_dir():
        for name in peers:
            notes[name] = f"not run: no tokenizer directory at {tokenizer} (--tokenizer)"
        peers = {}
    report: dict = {"rates": rates, "duration_s": a.duration, "repeat": a.repeat, "rate_tolerance": RATE_TOLERANCE,
                    "input_len": INPUT_LEN, "output_len": OUTPUT_LEN, "cpus": os.cpu_count(),
                    "loadavg_start": os.getloadavg()}
    with SimProcess(*SIM_ARGS) as sim:
        url = sim.url
        vc = None
        if a.skip_vllm:
            notes["vllm"] = "not run (--skip-vllm)"
        elif not (Path(a.vllm_python).exists() and Path(tokenizer).is_dir()):
            notes["vllm"] = f"not run: no vLLM venv at {a.vllm_python} or no tokenizer at {tokenizer}"
        else:
            try:
                vc = VllmClient(a.vllm_python, tokenizer, url, out / "vllm")
            except ClientFailed as exc:
                notes["vllm"] = f"not run: {exc}"

        def aegis_trial(rate: float, n: int, k: int) -> dict:
            reset(url)
            r = run_aegis(url, rate, n, out / f"aegis-rate-{rate:g}-{k}")
            return measured(url, rate, n, {x["request_id"]: x["ttft_ms"] for x in r["records"]},
                            r["summary"]["completed"])

        def vllm_trial(rate: float, n: int, k: int) -> dict:
            assert vc is not None
            reset(url)
            prefix = f"vb-{rate:g}-{k}-"
            res = vc.run(rate, n, "inf", prefix)
            return measured(url, rate, n, {f"{prefix}{i}": x * 1e3 if x else None for i, x in enumerate(res["ttfts"])},
                            res["completed"])

        def peer_trial(name: str, run):
            def trial(rate: float, n: int, k: int) -> dict:
                reset(url)
                ttft, answered = run(peers[name], url, tokenizer, out / f"{name}-rate-{rate:g}-{k}", rate, n)
                return measured(url, rate, n, ttft, answered)
            return trial

        clients = {"aegis": aegis_trial, **({"vllm": vllm_trial} if vc is not None else {}),
                   **{name: peer_trial(name, {"aiperf": aiperf, "guidellm": guidellm}[name]) for name in peers}}
        try:
            per_rate, failed = ladder(rates, a.duration, a.repeat, clients, judge, stop_on_fail=True)
        finally:
            if vc is not None:
                vc.close()
    report["loadavg_end"] = os.getloadavg()
    rows = []
    base = sustainable(per_rate["aegis"])
    for who in ("aegis", "vllm", "aiperf", "guidellm"):
        if who not in clients:
            rows.append((who, notes.get(who, "not run")))
            report[who] = {"note": notes.get(who)}
            continue
        res = per_rate[who]
        best = sustainable(res)
        low = res.get(rates[0])
        added = [e for x in (low["trials"] if low else []) for e in x["ttft_added_ms"]]
        med = float(np.median(added)) if added else None
        report[who] = {"per_rate": res, "sustainable_rate": best, "failed": failed.get(who),
                       "ttft_added_median_ms": med, "ttft_added_n": len(added)}
        if best is None:
            rows.append((who, failed.get(who) or f"no rate delivered (the lowest: {rates[0]:g} req/s)"))
            continue
        top = best == rates[-1] and res[best]["ok"]
        ratio = f"{best / base:.2f}x" if base else "n/a"
        rows.append((who, f"{'>= ' if top else ''}{best:g}", ratio, f"{res[best]['server_arrival_lag_p99_ms']:.1f}",
                     "n/a" if med is None else f"{med:+.2f}", failed.get(who, "")))
    (out / "compare_peers.json").write_text(json.dumps(report, indent=2))

    print(f"\n=== sustainable rate (the server sees >= {1 - RATE_TOLERANCE:.0%} of the offered constant rate, every "
          f"request answered; median of {a.repeat}) and TTFT added over the server's truth at {rates[0]:g} req/s ===")
    print(f"{'client':<10} {'sustainable req/s':>18} {'ratio to aegis':>15} {'arrival lag p99 there (ms)':>27} "
          f"{'median TTFT added (ms)':>23}")
    for row in rows:
        if len(row) == 2:
            print(f"{row[0]:<10} {row[1]}")
        else:
            print(f"{row[0]:<10} {row[1]:>18} {row[2]:>15} {row[3]:>27} {row[4]:>23}"
                  + (f"  (then {row[5]})" if row[5] else ""))
    print(f"load average at start/end: {report['loadavg_start'][0]:.1f} / {report['loadavg_end'][0]:.1f} "
          f"on {os.cpu_count()} CPUs; results in {out}")


if __name__ == "__main__":
    main()
