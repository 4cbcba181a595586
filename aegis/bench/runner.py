"""Runs a benchmark: builds the workload, starts worker processes, scrapes metrics, writes results."""
from __future__ import annotations

import asyncio
import collections
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

import aiohttp

from aegis._version import __version__
from aegis.bench import metrics, workload
from aegis.bench.arrival import ArrivalSpec, schedule
from aegis.bench.client import RequestOptions
from aegis.bench.endpoints import Endpoint
from aegis.bench.progress import Progress
from aegis.bench.prom import Scraper
from aegis.bench.records import RequestRecord, read_records
from aegis.bench.worker import SATURATED_CPU, WorkerPlan, worker_main
from aegis.errors import AegisError, UsageError
from aegis.util.apikey import auth_headers

REQUESTS_FILE = "requests.jsonl"
SUMMARY_FILE = "summary.json"
PROM_FILE = "prometheus.csv"
CONFIG_FILE = "config.json"
WORKLOAD_FILE = "workload.jsonl"
SEGMENTS_FILE = "segments.jsonl"
# On this project's 2-core test machine, shared with the server, dispatch lag
# p99 stayed under 5 ms with one worker at 200 req/s and two at 300 req/s
# (benchmarks/bench/compare_vllm.py); `--workers auto` starts one worker per
# this many req/s, at most one per core.
PER_WORKER_RATE = 250.0
PER_WORKER_CONCURRENCY = 256
CLOSED_LOOP_POOL = 1000
ROUTINGS = ("round-robin", "least-outstanding")


@dataclass
class BenchConfig:
    """A benchmark run, as given on the command line (the API key is never stored)."""

    endpoints: list[Endpoint]
    model: str
    output_dir: str
    workload: workload.WorkloadSpec = field(default_factory=workload.WorkloadSpec)
    request: RequestOptions = field(default_factory=RequestOptions)
    arrival: ArrivalSpec = field(default_factory=ArrivalSpec)
    num_requests: int | None = None
    duration: float | None = None
    concurrency: int | None = None
    routing: str = "round-robin"
    workers: int | None = None         # None: auto
    slo: dict = field(default_factory=dict)
    scrape: bool = True
    scrape_interval: float = 1.0
    label: str | None = None

    def validate(self) -> None:
        if self.routing not in ROUTINGS:
            raise UsageError(f"unknown --routing {self.routing!r}; choose one of {', '.join(ROUTINGS)}")
        if self.sessions:
            given = [f for f, v in (("--rate", self.arrival.rate), ("--arrival trace", self.arrival.trace),
                                    ("--concurrency", self.concurrency), ("--num-requests", self.num_requests))
                     if v is not None]
            if given:
                raise UsageError(f"--workload sessions holds --num-sessions conversations at once, each turn "
                                 f"after the last answer (and --think-time); drop {given[0]}")
        if self.arrival.rate is None and self.arrival.process != "trace" and not self.concurrency \
                and not self.sessions:
            raise UsageError("give --rate (open loop), --concurrency (closed loop) or --arrival trace")
        if self.num_requests is None and self.duration is None and self.arrival.process != "trace" \
                and not self.sessions:
            raise UsageError("give --num-requests or --duration")
        if self.num_requests is not None and self.num_requests < 1:
            raise UsageError("--num-requests must be at least 1")
        if self.duration is not None and self.duration <= 0:
            raise UsageError("--duration must be positive")
        if self.concurrency is not None and self.concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise UsageError("--workers must be at least 1")
        self.workload.validate()
        self.arrival.validate()

    @property
    def sessions(self) -> bool:
        return self.workload.kind == "sessions"

    @property
    def closed_loop(self) -> bool:
        return self.arrival.rate is None and self.arrival.process != "trace"

    def schedule(self):
        """The open loop's intended send offsets (one per request of the workload)."""
        return schedule(self.arrival, self.num_requests, self.duration)

    def to_json(self) -> dict:
        d = {
            "model": self.model, "endpoints": [e.to_json() for e in self.endpoints],
            "workload": asdict(self.workload), "request": asdict(self.request),
            "arrival": {**asdict(self.arrival), "trace": list(self.arrival.trace) if self.arrival.trace else None},
            "num_requests": self.num_requests, "duration": self.duration, "concurrency": self.concurrency,
            "routing": self.routing, "workers": self.workers, "slo": self.slo, "scrape": self.scrape,
            "scrape_interval": self.scrape_interval, "label": self.label,
        }
        return d

    @classmethod
    def from_json(cls, d: dict, output_dir: str) -> BenchConfig:
        arr = dict(d["arrival"])
        arr["trace"] = tuple(arr["trace"]) if arr.get("trace") else None
        return cls(endpoints=[Endpoint(**e) for e in d["endpoints"]], model=d["model"], output_dir=output_dir,
                   workload=workload.WorkloadSpec(**d["workload"]), request=RequestOptions(**d["request"]),
                   arrival=ArrivalSpec(**arr), num_requests=d["num_requests"], duration=d["duration"],
                   concurrency=d["concurrency"], routing=d["routing"], workers=d["workers"], slo=d["slo"],
                   scrape=d["scrape"], scrape_interval=d["scrape_interval"], label=d.get("label"))


async def discover_model(url: str, headers: dict[str, str]) -> str:
    """The first model id a server lists on /v1/models."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            async with s.get(url + "/v1/models", headers=headers) as r:
                if r.status == 401:
                    raise UsageError(f"{url} refused the API key (HTTP 401); pass --api-key-file "
                                     "or set AEGIS_API_KEY")
                if r.status != 200:
                    raise AegisError(f"{url}/v1/models answered HTTP {r.status}; pass --model")
                data = await r.json(content_type=None)
                models = [m["id"] for m in data.get("data", []) if not m.get("parent")]
                if not models:
                    raise AegisError(f"{url}/v1/models lists no model; pass --model")
                return models[0]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise AegisError(f"cannot reach {url} ({type(exc).__name__}: {exc}); check the URL "
                         "and that the server is up") from None


def _n_workers(cfg: BenchConfig, n_requests: int, offsets) -> int:
    if cfg.workers:
        return cfg.workers
    cores = os.cpu_count() or 1
    if cfg.sessions:
        return max(1, min(cores, math.ceil(cfg.workload.num_sessions / PER_WORKER_CONCURRENCY)))
    if cfg.closed_loop:
        return max(1, min(cores, math.ceil((cfg.concurrency or 1) / PER_WORKER_CONCURRENCY)))
    rate = cfg.arrival.rate
    if rate is None:  # trace: its mean rate
        span = float(offsets[-1]) if len(offsets) > 1 else 0.0
        rate = len(offsets) / span if span > 0 else 1.0
    return max(1, min(cores, math.ceil(rate / PER_WORKER_RATE)))


class Run:
    """One invocation of `aegis bench` (a new run or a resumed one) writing into output_dir."""

    def __init__(self, cfg: BenchConfig, api_key: str | None, resume: bool = False,
                 progress: bool | None = None, out=sys.stdout):
        self.cfg, self.api_key, self.resume, self.out = cfg, api_key, resume, out
        self.show_progress = sys.stderr.isatty() if progress is None else progress
        self.dir = cfg.output_dir
        self.path = lambda name: os.path.join(self.dir, name)
        self.headers = auth_headers(api_key)
        self.interrupted = False

    # -- preparation -------------------------------------------------------
    def _prepare_new(self) -> tuple[list[workload.RequestSpec], str]:
        cfg = self.cfg
        os.makedirs(self.dir, exist_ok=True)
        if os.path.exists(self.path(REQUESTS_FILE)):
            raise UsageError(f"{self.dir} already holds a run; continue it with --resume or choose "
                             "another --output-dir")
        n = (cfg.num_requests or CLOSED_LOOP_POOL) if cfg.closed_loop else len(cfg.schedule())
        if n == 0:
            raise UsageError("the schedule holds no request; raise --duration or --rate")
        specs = asyncio.run(self._build_workload(n))
        workload.save(self.path(WORKLOAD_FILE), specs)
        run_id = uuid.uuid4().hex[:12]
        with open(self.path(CONFIG_FILE), "w") as fh:
            json.dump({"aegis_version": __version__, "run_id": run_id, "config": cfg.to_json()}, fh, indent=2)
        return specs, run_id

    async def _build_workload(self, n: int) -> list[workload.RequestSpec]:
        cfg = self.cfg
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            tok = None
            if cfg.workload.tokenize:
                tok = workload.ServerTokenizer(session, cfg.endpoints[0].url, cfg.model, self.headers)
                if not await tok.probe():
                    tok = None
            try:
                return await workload.build(cfg.workload, n, tok)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise AegisError(f"building prompts with {cfg.endpoints[0].url}/tokenize failed ({exc}); "
                                 "retry or pass --no-tokenize") from None

    def _prepare_resume(self) -> tuple[list[workload.RequestSpec], str]:
        try:
            with open(self.path(CONFIG_FILE)) as fh:
                stored = json.load(fh)
        except (OSError, ValueError):
            raise UsageError(f"{self.dir} holds no run to resume ({CONFIG_FILE} missing); start a new run") from None
        endpoints = self.cfg.endpoints
        self.cfg = BenchConfig.from_json(stored["config"], self.dir)
        if self.cfg.sessions:
            raise UsageError(f"{self.dir} is a sessions run: its conversations' replies are not stored, so it "
                             "cannot be resumed; start a new run")
        if endpoints:
            self.cfg.endpoints = endpoints  # the fleet may have moved; the workload stays
        return workload.load(self.path(WORKLOAD_FILE)), stored["run_id"]

    # -- execution ---------------------------------------------------------
    def execute(self) -> dict:
        specs, run_id = self._prepare_resume() if self.resume else self._prepare_new()
        cfg = self.cfg
        done = read_records(self.path(REQUESTS_FILE), repair=True)
        done_idx = {r["index"] for r in done}
        segment = max((r.get("segment", 0) for r in done), default=-1) + 1
        if os.path.exists(self.path(SEGMENTS_FILE)):
            with open(self.path(SEGMENTS_FILE)) as fh:
                segment = max(segment, sum(1 for line in fh if line.strip()))
        n_total = len(specs)
        offsets = None
        if not cfg.closed_loop:
            offsets = cfg.schedule()
            if len(offsets) != n_total:
                raise AegisError(f"{self.dir}: the stored workload holds {n_total} requests but the schedule "
                                 f"{len(offsets)} (a run of another aegis version?); start a new run")
        remaining = [i for i in range(n_total) if i not in done_idx]
        if self.resume and not remaining and (cfg.num_requests or not cfg.closed_loop):
            self.out.write(f"aegis: {self.dir}: every request already finished; summary rewritten\n")
            return self._summarize(done, [], None)
        nw = _n_workers(cfg, n_total, offsets if offsets is not None else [0.0])
        plans = []
        t_shift = float(offsets[remaining[0]]) if offsets is not None and remaining else 0.0
        for w in range(nw):
            mine = remaining[w::nw]
            plan = WorkerPlan(
                wid=w, nworkers=nw, specs=specs, endpoints=cfg.endpoints, model=cfg.model,
                headers=self.headers, opts=cfg.request, jsonl_path=self.path(REQUESTS_FILE),
                run_id=run_id, segment=segment, duration=cfg.duration if not self.resume else None,
                routing=cfg.routing, t0_unix_offset=time.time() - time.perf_counter())
            if cfg.sessions:
                by_session: dict[int, list[int]] = {}
                for i in remaining:
                    by_session.setdefault(specs[i].session or 0, []).append(i)
                plan.sessions = [turns for sid, turns in sorted(by_session.items()) if sid % nw == w]
                plan.think_time = cfg.workload.think_time
            elif cfg.closed_loop:
                assert cfg.concurrency is not None  # validate(): a closed loop is one with --concurrency
                plan.closed_indices = mine if cfg.num_requests else None
                plan.concurrency = cfg.concurrency // nw + (1 if w < cfg.concurrency % nw else 0)
            else:
                assert offsets is not None  # scheduled above for every open loop
                plan.items = [(i, float(offsets[i]) - t_shift) for i in mine]
                if cfg.concurrency:
                    plan.concurrency = max(1, cfg.concurrency // nw + (1 if w < cfg.concurrency % nw else 0))
            plans.append(plan)
        expected = len(remaining) if (cfg.num_requests or cfg.sessions or not cfg.closed_loop) else None
        if not cfg.closed_loop and cfg.duration:
            assert offsets is not None  # scheduled above for every open loop
            expected = sum(1 for i in remaining if float(offsets[i]) - t_shift < cfg.duration)
        wstats, t0, scrape = self._launch(plans, segment, expected)
        records = read_records(self.path(REQUESTS_FILE))
        return self._summarize(records, wstats, scrape)

    def _launch(self, plans: list[WorkerPlan], segment: int, expected: int | None):
        ctx = mp.get_context("fork") if threading.active_count() == 1 else mp.get_context("spawn")
        ready_q, stats_q = ctx.Queue(), ctx.Queue()
        start_evt, t0_val = ctx.Event(), ctx.Value("d", 0.0)
        procs = [ctx.Process(target=worker_main, args=(p, ready_q, start_evt, t0_val, stats_q),
                             name=f"aegis-bench-worker-{p.wid}", daemon=True) for p in plans]
        for p in procs:
            p.start()
        try:
            return asyncio.run(self._coordinate(procs, ready_q, start_evt, t0_val, stats_q, segment, expected))
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)

    async def _coordinate(self, procs, ready_q, start_evt, t0_val, stats_q, segment, expected):
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 60
        ready = 0
        while ready < len(procs):
            try:
                await loop.run_in_executor(None, ready_q.get, True, 0.5)
                ready += 1
            except queue.Empty:
                if not all(p.is_alive() for p in procs) or time.monotonic() > deadline:
                    raise AegisError("a load-generating worker failed to start; re-run with --debug") from None
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._interrupt, procs, stop)
        scraper = None
        tasks = []
        if self.cfg.scrape:
            # The baseline scrape comes before the first request: its counters hold none of the run's tokens.
            scraper = Scraper({e.name: e.metrics_url for e in self.cfg.endpoints}, self.headers,
                              self.path(PROM_FILE), self.cfg.scrape_interval)
            baseline = asyncio.Event()
            tasks.append(loop.create_task(scraper.run(stop, baseline)))
            await baseline.wait()  # bounded: each scrape times out (ClientTimeout), and a failed one sets it
        t0 = time.perf_counter() + 0.05
        if scraper is not None:
            scraper.start(t0)
        with open(self.path(SEGMENTS_FILE), "a") as fh:
            fh.write(json.dumps({"segment": segment, "t0_monotonic": t0,
                                 "t0_unix": t0 + time.time() - time.perf_counter(), "workers": len(procs),
                                 "expected_requests": expected}) + "\n")
        prog = Progress(self.path(REQUESTS_FILE), expected, self.cfg.duration, t0, enabled=self.show_progress)
        tasks.append(loop.create_task(prog.run(stop)))
        t0_val.value = t0
        start_evt.set()
        stats = []
        while any(p.is_alive() for p in procs) and not stop.is_set():
            await asyncio.sleep(0.1)
            stats.extend(_drain(stats_q))
        stop.set()
        for p in procs:
            await loop.run_in_executor(None, p.join, 10)
        stats.extend(_drain(stats_q))
        await asyncio.gather(*tasks, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        return sorted(stats, key=lambda s: s["worker"]), t0, scraper.summary() if scraper else None

    def _interrupt(self, procs, stop) -> None:
        self.interrupted = True
        for p in procs:
            if p.is_alive():
                p.terminate()
        stop.set()

    # -- results -----------------------------------------------------------
    def _summarize(self, records: list[RequestRecord], wstats: list[dict], scrape: dict | None) -> dict:
        cfg = self.cfg
        s = metrics.compute(records, slo=cfg.slo)
        reasons, starved = client_limits(s, wstats)
        s.update({
            "request_rate": cfg.arrival.rate,
            "status": "interrupted" if self.interrupted else "complete",
            "client_bound": bool(reasons), "client_bound_reasons": reasons,
            "client_starved": bool(starved), "client_starved_reasons": starved,
            "label": cfg.label, "model": cfg.model, "endpoints": [e.name for e in cfg.endpoints],
            "workers": wstats, "num_workers": len(wstats),
            "input_lengths_exact": all(sp.get("exact", False) for sp in _read_jsonl(self.path(WORKLOAD_FILE))),
            "per_endpoint": metrics.breakdown(records, "endpoint", s["duration"], cfg.slo),
            "prometheus": scrape,
            "aegis_version": __version__,
        })
        if any(r.get("adapter") for r in records):
            s["per_adapter"] = metrics.breakdown(records, "adapter", s["duration"], cfg.slo)
        if cfg.workload.kind == "shared-prefix":
            s["per_group"] = metrics.breakdown(records, "group", s["duration"], cfg.slo)
        if cfg.sessions:
            planned = collections.Counter(int(sp["session"]) for sp in _read_jsonl(self.path(WORKLOAD_FILE)))
            s["sessions"] = metrics.sessions(records, dict(planned))
            s["per_turn"] = metrics.breakdown(records, "turn", s["duration"], cfg.slo)
        tmp = self.path(SUMMARY_FILE + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(s, fh, indent=2)
        os.replace(tmp, self.path(SUMMARY_FILE))
        return s


def client_limits(summary: dict, wstats: list[dict]) -> tuple[list[str], list[str]]:
    """Why the client, not the server, limited a run: (CPU-bound reasons, starved reasons).

    CPU-bound: a worker saturated its CPU, or the schedule slipped (dispatch lag p99 > 5 ms) with no sign
    of other work holding the CPU. Starved: the schedule slipped while a worker, not saturated, waited
    runnable for a CPU (the kernel's run-queue wait, worker.STARVED_WAIT) -- other work on the machine
    descheduled it; more workers on the same cores would not help.
    """
    bound, starved = [], []
    for w in wstats:
        if w.get("saturated"):
            bound.append(f"worker {w['worker']} saturated (CPU >= {100 * SATURATED_CPU:.0f}% in "
                         f"{w['saturated_windows']}/{w['windows']} s)")
    lag = summary["dispatch_lag_ms"]["p99"]
    if lag > metrics.CLIENT_BOUND_LAG_MS:
        why = f"dispatch lag p99 {lag:.1f} ms > {metrics.CLIENT_BOUND_LAG_MS:g} ms"
        waiting = [w for w in wstats if w.get("starved") and not w.get("saturated")]
        if bound or not waiting:
            bound.insert(0, why)
        else:
            starved = [why] + [f"worker {w['worker']} waited for a CPU {100 * w['cpu_wait_mean']:.0f}% of the time "
                               f"while using {100 * w['cpu_util_mean']:.0f}% (event-loop lag p99 "
                               f"{w['loop_lag_p99_ms']:.0f} ms)" for w in waiting]
    return bound, starved


def _drain(q) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def _read_jsonl(path: str) -> list[dict]:
    try:
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError):
        return []
