"""Click commands `aegis bench`, `aegis probe` and `aegis smoke`."""
from __future__ import annotations

import asyncio
import json
import math
import os
import time

import click

from aegis.bench import workload
from aegis.bench.arrival import PROCESSES, ArrivalSpec, load_trace
from aegis.bench.client import RequestOptions
from aegis.bench.endpoints import Fleet, fleet_from_urls, load_endpoints
from aegis.bench.http import CONNECT_TIMEOUT_S
from aegis.bench.slo import parse_goodput
from aegis.errors import AegisError, UsageError
from aegis.util.apikey import auth_headers, resolve_api_key

MAX_REQUESTS = 10 ** 8  # a bench that plans more would fill memory with its schedule before it sent one
MAX_RATE = 1e6  # requests/s: far beyond what one client process sends


def _target_options(f):
    for opt in reversed([
        click.option("--endpoints", "endpoints_path", type=click.Path(), default=None,
                     help="The launcher's endpoints.json, or its run directory."),
        click.option("--url", "urls", multiple=True, help="An OpenAI-compatible server (repeatable)."),
        click.option("--model", default=None, help="Served model name (default: the fleet's or the server's)."),
        click.option("--api-key-file", type=click.Path(), default=None,
                     help="File holding the API key (else AEGIS_API_KEY, the endpoints file's, OPENAI_API_KEY)."),
    ]):
        f = opt(f)
    return f


def _load_options(f):
    opts = [
        click.option("--workload", "kind", type=click.Choice(workload.WORKLOADS), default="random", show_default=True),
        click.option("--api", type=click.Choice(workload.APIS), default=None,
                     help="[default: completions; sessions: chat]"),
        click.option("--input-len", type=int, default=512, show_default=True, help="Prompt tokens (random)."),
        click.option("--output-len", type=int, default=None,
                     help="Generated tokens [default: 128; ShareGPT: the dataset's]."),
        click.option("--range-ratio", type=float, default=0.0, show_default=True,
                     help="Random lengths uniform in [L(1-r), L(1+r)]."),
        click.option("--num-groups", type=int, default=4, show_default=True, help="Shared-prefix groups."),
        click.option("--prompts-per-group", type=int, default=8, show_default=True),
        click.option("--prefix-len", type=int, default=256, show_default=True),
        click.option("--suffix-len", type=int, default=64, show_default=True),
        click.option("--dataset", type=click.Path(), default=None, help="ShareGPT-format JSON file."),
        click.option("--num-sessions", type=click.IntRange(1, MAX_REQUESTS), default=4, show_default=True,
                     help="Sessions: conversations held at once."),
        click.option("--turns", type=click.IntRange(1, MAX_REQUESTS), default=None,
                     help=f"Sessions: turns each [default: the dataset's; generated: {workload.GENERATED_TURNS}]."),
        click.option("--think-time", type=float, default=0.0, show_default=True,
                     help="Sessions: seconds from an answer to the next turn."),
        click.option("--system-len", type=int, default=1024, show_default=True,
                     help="Generated sessions: tokens of the shared system prompt."),
        click.option("--turn-len", type=int, default=64, show_default=True,
                     help="Generated sessions: tokens of each user (tool output) turn."),
        click.option("--lora", default=None, help="Adapters to spread requests over: NAME,NAME,... or 'auto'."),
        click.option("--lora-mix", type=click.Choice(workload.LORA_MIXES), default="uniform", show_default=True),
        click.option("--zipf-s", type=float, default=1.0, show_default=True, help="Zipf exponent for --lora-mix zipf."),
        click.option("--no-tokenize", is_flag=True, help="Do not fit prompt lengths with the server's /tokenize."),
        click.option("--arrival", type=click.Choice(PROCESSES), default="poisson", show_default=True),
        click.option("--burstiness", type=float, default=1.0, show_default=True,
                     help="Gamma shape: <1 burstier, >1 smoother than Poisson."),
        click.option("--trace", type=click.Path(), default=None, help="Timestamps file for --arrival trace."),
        click.option("--concurrency", type=click.IntRange(1, MAX_REQUESTS), default=None,
                     help="Closed loop with this many in flight; with --rate, a cap on requests in flight."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--routing", type=click.Choice(["round-robin", "least-outstanding"]), default="round-robin",
                     show_default=True),
        click.option("--workers", type=int, default=None, help="Load-generating processes [default: auto]."),
        click.option("--timeout", type=float, default=600.0, show_default=True, help="Per-request timeout (s)."),
        click.option("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S, show_default=True,
                     help="Seconds to open a connection; longer counts as a connect_timeout error."),
        click.option("--stream/--no-stream", default=True, show_default=True),
        click.option("--continuous-usage/--no-continuous-usage", default=True, show_default=True,
                     help="Ask for usage in every chunk (vLLM's continuous_usage_stats)."),
        click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True),
        click.option("--extra-body", default=None, help="JSON object merged into every request body."),
        click.option("--slo", default=None,
                     help="Goodput: per-request limits in ms, ttft=500,tpot=50,e2el=10000 (= max_ttft_ms=500,...)."),
        click.option("--scrape/--no-scrape", default=True, show_default=True, help="Scrape /metrics every interval."),
        click.option("--scrape-interval", type=click.FloatRange(0.05, 3600), default=1.0, show_default=True),
        click.option("--output-dir", type=click.Path(), default=None, help="Results directory."),
        click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal]."),
        click.option("--label", default=None, help="A name stored in the results."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _fleet(endpoints_path, urls, model) -> Fleet:
    if endpoints_path and urls:
        raise UsageError("give --endpoints or --url, not both")
    if endpoints_path:
        return load_endpoints(endpoints_path)
    if urls:
        return fleet_from_urls(list(urls), model)
    raise UsageError("say where to send load: --endpoints RUN_DIR or --url http://host:port")


def _resolve_target(endpoints_path, urls, model, api_key_file):
    from aegis.bench.runner import discover_model
    fleet = _fleet(endpoints_path, urls, model)
    eps = fleet.for_model(model)
    key = resolve_api_key(api_key_file, fleet.api_key_file)
    if model is None:
        model = eps[0].model or asyncio.run(discover_model(eps[0].url, auth_headers(key)))
    return eps, model, key


def _build_config(p: dict, eps, model, output_dir, rate, num_requests, duration):
    from aegis.bench.runner import BenchConfig
    lora = []
    if p["lora"] == "auto":
        lora = sorted({a for e in eps for a in e.lora_adapters})
        if not lora:
            raise UsageError("--lora auto found no adapters in the endpoints file; list them: --lora a,b")
    elif p["lora"]:
        lora = [x.strip() for x in p["lora"].split(",") if x.strip()]
    extra = {}
    if p["extra_body"]:
        try:
            extra = json.loads(p["extra_body"])
        except ValueError:
            raise UsageError("--extra-body must be a JSON object, e.g. '{\"temperature\": 0}'") from None
        if not isinstance(extra, dict):
            raise UsageError("--extra-body must be a JSON object")
    process = p["arrival"]
    if process == "poisson" and p["burstiness"] != 1.0:
        process = "gamma"
    trace = load_trace(p["trace"]) if p["trace"] else None
    if process == "trace" and trace is None:
        raise UsageError("--arrival trace needs --trace FILE")
    if p["timeout"] <= 0:
        raise UsageError("--timeout must be positive")
    if not (p["connect_timeout"] > 0 and math.isfinite(p["connect_timeout"])):
        raise UsageError("--connect-timeout must be a positive number of seconds, e.g. --connect-timeout 10")
    api = p["api"] or ("chat" if p["kind"] == "sessions" else "completions")
    wl = workload.WorkloadSpec(
        kind=p["kind"], api=api, input_len=p["input_len"], output_len=p["output_len"],
        range_ratio=p["range_ratio"], num_groups=p["num_groups"], prompts_per_group=p["prompts_per_group"],
        prefix_len=p["prefix_len"], suffix_len=p["suffix_len"], dataset=p["dataset"], lora=lora,
        lora_mix=p["lora_mix"], zipf_s=p["zipf_s"], seed=p["seed"], tokenize=not p["no_tokenize"],
        num_sessions=p["num_sessions"], turns=p["turns"], think_time=p["think_time"], system_len=p["system_len"],
        turn_len=p["turn_len"])
    if wl.kind == "shared-prefix" and num_requests is None and duration is None:
        num_requests = wl.num_groups * wl.prompts_per_group
    cfg = BenchConfig(
        endpoints=eps, model=model, output_dir=output_dir, workload=wl,
        request=RequestOptions(api=api, stream=p["stream"], continuous_usage=p["continuous_usage"],
                               ignore_eos=p["ignore_eos"], timeout=p["timeout"],
                               connect_timeout=p["connect_timeout"], extra_body=extra),
        arrival=ArrivalSpec(process=process, rate=rate, burstiness=p["burstiness"], trace=trace, seed=p["seed"]),
        num_requests=num_requests, duration=duration, concurrency=p["concurrency"], routing=p["routing"],
        workers=p["workers"], slo=parse_goodput(p["slo"]), scrape=p["scrape"], scrape_interval=p["scrape_interval"],
        label=p["label"])
    cfg.validate()
    return cfg


def _default_dir(prefix: str) -> str:
    return os.path.abspath(f"aegis-{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")


@click.command("bench")
@_target_options
@_load_options
@click.option("--rate", type=click.FloatRange(0, MAX_RATE, min_open=True), default=None,
              help="Open-loop arrival rate (req/s).")
@click.option("--num-requests", type=click.IntRange(1, MAX_REQUESTS), default=None, help="Requests to send.")
@click.option("--duration", type=click.FloatRange(0, 30 * 86400, min_open=True), default=None,
              help="Stop dispatching after this many seconds.")
@click.option("--resume", is_flag=True, help="Continue the run in --output-dir (its stored settings).")
@click.option("--repeat", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Run K times (OUTPUT_DIR/repeat-<i>/); summary: mean and 95% CI per headline metric.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def bench_cmd(endpoints_path, urls, model, api_key_file, rate, num_requests, duration, resume, repeat, as_json,
              **p):
    """Send load to OpenAI-compatible endpoints and measure it (vLLM's metrics)."""
    from aegis.bench.report import format_summary
    from aegis.bench.runner import BenchConfig, Run
    if resume and repeat > 1:
        raise UsageError("--resume continues one run; drop --repeat (or resume one repeat-<i> directory)")
    if resume:
        if not p["output_dir"]:
            raise UsageError("--resume needs --output-dir DIR (the run to continue)")
        eps, key = [], None
        if endpoints_path or urls:
            eps, model, key = _resolve_target(endpoints_path, urls, model, api_key_file)
        else:
            key = resolve_api_key(api_key_file)
        cfg = BenchConfig(endpoints=eps, model=model or "", output_dir=os.path.abspath(p["output_dir"]))
        run = Run(cfg, key, resume=True, progress=p["progress"])
    else:
        eps, model, key = _resolve_target(endpoints_path, urls, model, api_key_file)
        out = os.path.abspath(p["output_dir"]) if p["output_dir"] else _default_dir("bench")
        if rate and duration and not num_requests and rate * duration > MAX_REQUESTS:
            raise UsageError(f"--rate {rate:g} for --duration {duration:g} s plans {rate * duration:.3g} requests; "
                             f"at most {MAX_REQUESTS:.0e}: lower one, or give --num-requests")
        cfg = _build_config(p, eps, model, out, rate, num_requests, duration)
        if repeat > 1:
            from aegis.bench.repeat import format_repeat, run_repeats
            result, interrupted = run_repeats(cfg, repeat, key, p["progress"], lambda m: click.echo(m, err=as_json))
            click.echo(json.dumps(result, indent=2) if as_json else format_repeat(result, out))
            if interrupted:
                raise AegisError(f"interrupted; the finished repeats are in {out}")
            return
        run = Run(cfg, key, progress=p["progress"])
    summary = run.execute()
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary, run.dir))
    if run.interrupted:
        raise AegisError(f"interrupted; finished requests are in {run.dir}; continue with --resume")


@click.command("probe")
@_target_options
@_load_options
@click.option("--rates", default=None, help="Arrival rates to try in turn, e.g. 0.5,1,2,4,8.")
@click.option("--search", "do_search", is_flag=True,
              help="Instead of --rates: find the highest rate that meets --slo (percentiles, e.g. ttft_p99=500).")
@click.option("--duration", type=click.FloatRange(0, 30 * 86400, min_open=True), default=60.0, show_default=True,
              help="Seconds per run.")
@click.option("--stop-early", is_flag=True, help="Stop after the first TOO HIGH or SLOW rate.")
@click.option("--search-start", type=click.FloatRange(0, MAX_RATE, min_open=True), default=1.0, show_default=True,
              help="Search: the first rate (req/s); doubled until one fails, halved until one passes.")
@click.option("--tolerance", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True,
              help="Search: stop bisecting when the lowest failing rate is within this fraction above the "
                   "highest passing one.")
@click.option("--max-repeats", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Search: most runs at one rate whose percentile's interval holds the limit.")
@click.option("--margin", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Search: an estimate farther than this fraction from the limit decides without repeats.")
@click.option("--max-rate", type=click.FloatRange(0, MAX_RATE, min_open=True), default=MAX_RATE,
              help="Search: never try a rate above this.")
@click.option("--max-points", type=click.IntRange(1, 1000), default=30, show_default=True,
              help="Search: most rates to try.")
def probe_cmd(endpoints_path, urls, model, api_key_file, rates, do_search, duration, stop_early, search_start,
              tolerance, max_repeats, margin, max_rate, max_points, **p):
    """Find the highest arrival rate the fleet serves well (one run per rate, or a search against an SLO)."""
    from aegis.bench.probe import run_probe
    if do_search and rates is not None:
        raise UsageError("give --rates (one run per rate) or --search (the highest rate meeting --slo), not both")
    if not do_search and rates is None:
        raise UsageError("give --rates R1,R2,... (one run per rate) or --search --slo ttft_p99=MS (the highest "
                         "rate meeting an SLO)")
    if do_search:
        _search(endpoints_path, urls, model, api_key_file, duration, p, search_start, tolerance, max_repeats,
                margin, max_rate, max_points, stop_early)
        return
    try:
        rate_list = [float(x) for x in rates.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--rates must be numbers separated by commas, not {rates!r}") from None
    if not rate_list or any(r <= 0 for r in rate_list):
        raise UsageError("--rates must list positive rates, e.g. 0.5,1,2")
    eps, model, key = _resolve_target(endpoints_path, urls, model, api_key_file)
    out = os.path.abspath(p["output_dir"]) if p["output_dir"] else _default_dir("probe")
    base = _build_config(p, eps, model, out, rate_list[0], None, duration)
    if os.path.exists(os.path.join(out, "probe.jsonl")):
        raise UsageError(f"{out} already holds a probe; choose another --output-dir")
    result = run_probe(base, rate_list, key, click.echo, progress=p["progress"], stop_early=stop_early)
    best = result["highest_ok_rate"]
    if any(r["client_bound"] for r in result["rates"]):
        click.echo("* CLIENT-BOUND: the load generator could not keep the schedule at this rate")
    if any(r.get("client_starved") for r in result["rates"]):
        click.echo("! CLIENT-STARVED: other work on this machine descheduled the load generator at this rate")
    click.echo(f"Highest OK rate: {best:g} req/s" if best is not None else "No rate was OK.")
    click.echo(f"Results: {out}")


def _search(endpoints_path, urls, model, api_key_file, duration, p, start, tolerance, max_repeats, margin,
            max_rate, max_points, stop_early):
    from aegis.bench.probe_search import MIN_REQUESTS, SEARCH_FILE, SEARCH_JSONL, Search, SearchSpec, final_lines
    from aegis.bench.slo import parse_search
    if stop_early:
        raise UsageError("--stop-early belongs to --rates; a search stops by itself")
    if p["arrival"] == "trace":
        raise UsageError("--search varies the arrival rate; --arrival trace fixes the send times: drop one")
    slo = parse_search(p["slo"])
    if start * duration < MIN_REQUESTS:
        raise UsageError(f"--search-start {start:g} for --duration {duration:g} s plans {start * duration:.3g} "
                         f"requests per run; a search point needs at least {MIN_REQUESTS}: raise one")
    if start > max_rate:
        raise UsageError(f"--search-start {start:g} is above --max-rate {max_rate:g}")
    eps, model, key = _resolve_target(endpoints_path, urls, model, api_key_file)
    out = os.path.abspath(p["output_dir"]) if p["output_dir"] else _default_dir("probe")
    if any(os.path.exists(os.path.join(out, f)) for f in (SEARCH_FILE, SEARCH_JSONL, "probe.jsonl")):
        raise UsageError(f"{out} already holds a probe; choose another --output-dir")
    base = _build_config({**p, "slo": None}, eps, model, out, start, None, duration)
    spec = SearchSpec(slo=slo, start=start, tolerance=tolerance, max_repeats=max_repeats, margin=margin,
                      max_rate=max_rate, max_points=max_points)
    doc = Search(base, spec, key, click.echo, p["progress"]).run()
    for line in final_lines(doc):
        click.echo(line)
    click.echo(f"Results: {out}")
    if doc["status"] == "interrupted":
        raise AegisError(f"interrupted; the rates measured are in {out}/{SEARCH_FILE}")


@click.command("smoke")
@_target_options
@click.option("--api", type=click.Choice(workload.APIS), default="completions", show_default=True)
@click.option("--prompt", default="Hello, my name is", show_default=True)
@click.option("--max-tokens", type=int, default=8, show_default=True)
@click.option("--expect", default=None, help="A regular expression the answer must match.")
@click.option("--timeout", type=float, default=120.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def smoke_cmd(endpoints_path, urls, model, api_key_file, api, prompt, max_tokens, expect, timeout, as_json):
    """Send one request per endpoint and per LoRA adapter, and check the answers."""
    import re

    from aegis.bench.smoke import format_rows, smoke
    if expect:
        try:
            re.compile(expect)
        except re.error as exc:
            raise UsageError(f"--expect {expect!r} is not a valid regular expression ({exc})") from None
    if max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    fleet = _fleet(endpoints_path, urls, model)
    key = resolve_api_key(api_key_file, fleet.api_key_file)
    rows = asyncio.run(smoke(fleet.endpoints, auth_headers(key), prompt=prompt, max_tokens=max_tokens, api=api,
                             timeout=timeout, expect=expect, model=model))
    click.echo(json.dumps(rows, indent=2) if as_json else format_rows(rows))
    failed = [r for r in rows if r["status"] == "FAIL"]
    if failed:
        raise AegisError(f"smoke: {len(failed)} of {len(rows)} checks failed (first: {failed[0]['endpoint']} "
                         f"{failed[0]['model']}: {failed[0]['detail']})")
    if not any(r["status"] == "OK" for r in rows):
        raise AegisError("smoke: no endpoint is ready; nothing was checked")
