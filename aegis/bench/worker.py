"""One load-generating process: sends its share of the schedule and appends each result to the JSONL."""
from __future__ import annotations

import asyncio
import ctypes
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import overload

from aegis.bench.client import RequestOptions, send
from aegis.bench.endpoints import Endpoint
from aegis.bench.http import Pool
from aegis.bench.records import RequestRecord, write_record
from aegis.bench.workload import RequestSpec

perf = time.perf_counter
MONITOR_TICK_S = 0.01
# The dispatcher sleeps until this long before a send, then yields in a busy
# loop: a sleeping process wakes up late (epoll's 1 ms rounding, scheduler latency).
SPIN_S = float(os.environ.get("AEGIS_BENCH_SPIN_MS", "1.0")) / 1e3
SATURATED_CPU = 0.9
# A worker waiting runnable for a CPU this fraction of the time (50 ms a second) was starved by other work.
STARVED_WAIT = 0.05
WARM_CONNECTIONS = 4         # per endpoint, in use at once before the clock starts (more at high rates)
SPARE_CONNECTIONS = 4        # idle connections kept ready per endpoint during the run


@dataclass
class WorkerPlan:
    """Everything one worker needs; shared with the parent by fork (or pickled by spawn)."""

    wid: int
    nworkers: int
    specs: list[RequestSpec]
    endpoints: list[Endpoint]
    model: str
    headers: dict[str, str]
    opts: RequestOptions
    jsonl_path: str
    run_id: str
    segment: int
    items: list[tuple[int, float]] | None = None   # open loop: (index, offset); None: closed loop
    closed_indices: list[int] | None = None         # closed loop with a request count
    concurrency: int | None = None                  # this worker's share of the cap / closed-loop slots
    sessions: list[list[int]] | None = None         # sessions: each one's turns (workload indices) in order
    think_time: float = 0.0                         # sessions: seconds from an answer's end to the next turn
    duration: float | None = None
    routing: str = "round-robin"
    t0_unix_offset: float = 0.0                     # time.time() - perf_counter() in the parent
    extra: dict = field(default_factory=dict)


def _set_parent_death_signal() -> None:
    """Die with the parent (a SIGKILLed bench must not leave load generators behind)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Router:
    """Chooses the endpoint of each request: round-robin or least outstanding requests."""

    def __init__(self, endpoints: list[Endpoint], routing: str):
        self.endpoints, self.routing = endpoints, routing
        self.outstanding = {e.name: 0 for e in endpoints}
        self.by_adapter: dict[str | None, list[Endpoint]] = {}

    def candidates(self, adapter: str | None) -> list[Endpoint]:
        if adapter not in self.by_adapter:
            eps = [e for e in self.endpoints if not adapter or not e.lora_adapters or adapter in e.lora_adapters]
            self.by_adapter[adapter] = eps or self.endpoints
        return self.by_adapter[adapter]

    def pick(self, index: int, adapter: str | None) -> Endpoint:
        eps = self.candidates(adapter)
        if self.routing == "least-outstanding" and len(eps) > 1:
            n = len(eps)
            start = index % n
            return min((eps[(start + k) % n] for k in range(n)), key=lambda e: self.outstanding[e.name])
        return eps[index % len(eps)]


def cpu_times() -> tuple[float, float | None]:
    """(CPU seconds this process used, seconds its event-loop thread waited runnable for a CPU, or None).

    The wait is the kernel's run_delay (/proc/thread-self/schedstat): time the thread could have run
    but other work held the CPU (a CPU quota's throttling counts too). None where Linux does not say.
    """
    try:
        with open("/proc/thread-self/schedstat") as fh:
            wait: float | None = int(fh.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        wait = None
    return time.process_time(), wait


class _Monitor:
    """Event-loop lag, CPU use and CPU wait of this process, to tell whether and why the client lagged."""

    def __init__(self):
        self.lags: list[float] = []
        self.cpu_windows: list[float] = []
        self.wait_windows: list[float] = []
        self.start = (perf(), *cpu_times())
        self.last = self.start

    def _window(self) -> tuple[float, float | None]:
        (w0, c0, q0), now = self.last, (perf(), *cpu_times())
        self.last = now
        wall = max(now[0] - w0, 1e-9)
        return (now[1] - c0) / wall, None if now[2] is None or q0 is None else (now[2] - q0) / wall

    async def run(self) -> None:
        while True:
            t = perf()
            await asyncio.sleep(MONITOR_TICK_S)
            self.lags.append(perf() - t - MONITOR_TICK_S)
            if perf() - self.last[0] >= 1.0:
                cpu, wait = self._window()
                self.cpu_windows.append(cpu)
                if wait is not None:
                    self.wait_windows.append(wait)

    def stats(self) -> dict:
        lags = sorted(self.lags) or [0.0]
        (w0, c0, q0), (w1, c1, q1) = self.start, (perf(), *cpu_times())
        wall = max(w1 - w0, 1e-9)
        cpu = self.cpu_windows or [(c1 - c0) / wall]
        busy = sum(1 for c in cpu if c >= SATURATED_CPU)
        run_wait = None if q0 is None or q1 is None else (q1 - q0) / wall
        waits = self.wait_windows or ([run_wait] if run_wait is not None else [])
        starved = sum(1 for w, c in zip(waits, cpu) if w >= STARVED_WAIT and c < SATURATED_CPU)
        return {"loop_lag_p50_ms": lags[len(lags) // 2] * 1e3,
                "loop_lag_p99_ms": lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1e3,
                "loop_lag_max_ms": lags[-1] * 1e3,
                "cpu_util_mean": (c1 - c0) / wall, "cpu_util_max": max(cpu),
                "saturated_windows": busy, "windows": len(self.cpu_windows),
                "saturated": bool(self.cpu_windows) and busy >= max(1, 0.2 * len(self.cpu_windows)),
                "cpu_wait_mean": run_wait, "cpu_wait_max": max(waits) if waits else None,
                "starved_windows": starved,
                "starved": bool(waits) and starved >= max(1, 0.2 * len(waits))}


@overload
def _r(x: float, nd: int = 3) -> float: ...
@overload
def _r(x: None, nd: int = 3) -> None: ...
def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


class Worker:
    """Dispatches requests at their intended times and writes one JSONL line per finished request."""

    def __init__(self, plan: WorkerPlan):
        self.plan = plan
        self.router = _Router(plan.endpoints, plan.routing)
        self.fd = -1
        self.sent = 0
        self.pool = Pool(spare=SPARE_CONNECTIONS, connect_timeout=plan.opts.connect_timeout)
        self.t0 = 0.0

    def _write(self, rec: RequestRecord) -> None:
        write_record(self.fd, rec)

    async def _one(self, index: int, intended: float, ready: float, waited: float,
                   messages: list[dict] | None = None) -> dict:
        """Send request `index` (a session's turn: with the conversation so far), record it, return send()'s result."""
        p = self.plan
        spec = p.specs[index % len(p.specs)]
        # a session's turns stay on one endpoint (its prefix cache holds the conversation)
        ep = self.router.pick(index if spec.session is None else spec.session, spec.adapter)
        model = spec.adapter or p.model
        headers = {**p.headers, "X-Request-Id": f"aegis-{p.run_id}-{p.segment}-{index}"}
        self.router.outstanding[ep.name] += 1
        self.sent += 1
        try:
            res = await send(self.pool, ep.url, p.opts, model, spec.prompt, spec.output_len, headers, messages)
        finally:
            self.router.outstanding[ep.name] -= 1
        t0, sent = self.t0, res["t_send"]
        tt = res["token_times"]
        ttft = (tt[0] - sent) * 1e3 if tt else None
        e2el = (res["t_end"] - sent) * 1e3
        out = res["output_tokens"]
        rec: RequestRecord = {
            "index": index, "segment": p.segment, "worker": p.wid,
            "request_id": headers["X-Request-Id"],
            "endpoint": ep.name, "url": ep.url, "model": model, "adapter": spec.adapter, "group": spec.group,
            "api": p.opts.api,
            "intended_s": round(intended - t0, 6), "sent_s": round(sent - t0, 6),
            "sent_unix": round(sent + p.t0_unix_offset, 6),
            "dispatch_lag_ms": _r((sent - ready) * 1e3), "queue_wait_ms": _r(waited * 1e3),
            "success": res["success"], "error_kind": res["error_kind"], "error": res["error"],
            "http_status": res["http_status"],
            "ttft_ms": _r(ttft), "e2el_ms": _r(e2el),
            "tpot_ms": _r((e2el - ttft) / (out - 1)) if ttft is not None and out > 1 else None,
            "itl_ms": [round((b - a) * 1e3, 3) for a, b in zip(tt, tt[1:])],
            "prompt_tokens": res["prompt_tokens"], "output_tokens": out,
            "output_tokens_source": res["output_tokens_source"],
            "target_prompt_tokens": spec.prompt_len, "target_output_tokens": spec.output_len,
            "finish_reason": res["finish_reason"], "connect_ms": _r(res["connect_ms"]),
        }
        if any(n > 1 for n in res["chunk_tokens"]):
            rec["chunk_tokens"] = res["chunk_tokens"]
        if spec.session is not None:
            assert spec.turn is not None  # build_sessions numbers every session's turns
            rec["session"], rec["turn"] = spec.session, spec.turn
        self._write(rec)
        return res

    async def _until(self, target: float) -> None:
        """Sleep until just before `target`, then yield in a busy loop until it (see SPIN_S)."""
        delay = target - perf()
        if delay > SPIN_S:
            await asyncio.sleep(delay - SPIN_S)
        while perf() < target:
            await asyncio.sleep(0)

    async def _sessions(self) -> None:
        """Each session's turns in order: the whole conversation so far plus the new user turn, the server's
        actual replies in the history, `think_time` from an answer's end to the next turn. A failed turn
        ends its session (the conversation has no reply to carry on from)."""
        p = self.plan
        assert p.sessions is not None  # run() takes this path only for a sessions workload
        end = self.t0 + p.duration if p.duration else None

        async def session(turns: list[int]) -> None:
            history: list[dict] = []
            due = self.t0
            for index in turns:
                if end is not None and due >= end:
                    return
                spec = p.specs[index]
                if spec.system:
                    history.append({"role": "system", "content": spec.system})
                messages = [*history, {"role": "user", "content": spec.prompt}]
                await self._until(due)
                res = await self._one(index, due, due, 0.0, messages)
                if not res["success"]:
                    return
                history = [*messages, {"role": "assistant", "content": res["reply"]}]
                due = res["t_end"] + p.think_time
        await asyncio.gather(*(session(t) for t in p.sessions))

    async def _open_loop(self) -> None:
        p, loop = self.plan, asyncio.get_running_loop()
        assert p.items is not None  # run() takes the open loop only when there are items
        sem = asyncio.Semaphore(p.concurrency) if p.concurrency else None
        tasks = set()
        end = self.t0 + p.duration if p.duration else None
        for index, offset in p.items:
            target = self.t0 + offset
            if end is not None and target >= end:
                break
            await self._until(target)
            ready, waited = target, 0.0
            if sem is not None:
                if sem.locked():
                    await sem.acquire()
                    ready = max(target, perf())
                    waited = ready - target
                else:
                    await sem.acquire()
            t = loop.create_task(self._one(index, target, ready, waited))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            if sem is not None:
                t.add_done_callback(lambda _t: sem.release())
        if tasks:
            await asyncio.gather(*tasks)

    async def _closed_loop(self) -> None:
        p = self.plan
        if p.closed_indices is not None:
            source = iter(p.closed_indices)
        else:
            source = iter(range(p.wid, 1 << 62, p.nworkers))
        end = self.t0 + p.duration if p.duration else None

        async def slot():
            free_at = self.t0
            for index in source:
                now = perf()
                if end is not None and now >= end:
                    return
                ready = max(free_at, self.t0)
                await self._one(index, ready, ready, 0.0)
                free_at = perf()
        await asyncio.gather(*(slot() for _ in range(p.concurrency or 1)))

    def _warm_count(self) -> int:
        """Connections per endpoint to open up front: about the requests in flight in 100 ms (at least the
        sessions or closed-loop slots), plus the pool's spare margin. Without that margin the first requests
        drop the idle count under SPARE_CONNECTIONS and the pool opens new connections in the background
        right as they go out: the server accepts those while the requests arrive (measured: 0.5-0.8 ms more
        per first-turn request at three sessions, counted as TTFT)."""
        p = self.plan
        n = WARM_CONNECTIONS
        if p.concurrency or p.sessions:
            n = max(n, p.concurrency or 0, len(p.sessions or ()))
        elif p.items and len(p.items) > 1:
            span = p.items[-1][1] - p.items[0][1]
            if span > 0:
                n = max(n, math.ceil(len(p.items) / span * 0.1))
        return min(math.ceil(n / max(len(p.endpoints), 1)), 256) + SPARE_CONNECTIONS

    async def run(self, ready_cb, wait_start) -> dict:
        p = self.plan
        self.fd = os.open(p.jsonl_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            await asyncio.gather(*(self.pool.warm(e.url, self._warm_count()) for e in p.endpoints))
            ready_cb()
            self.t0 = await wait_start()
            mon = _Monitor()
            mon_task = asyncio.get_running_loop().create_task(mon.run())
            start = perf()
            try:
                if p.sessions is not None:
                    await self._sessions()
                elif p.items is not None:
                    await self._open_loop()
                else:
                    await self._closed_loop()
            finally:
                mon_task.cancel()
        finally:
            os.close(self.fd)
            self.pool.close()
        return {"worker": p.wid, "sent": self.sent, "busy_s": perf() - start, **mon.stats()}


def worker_main(plan: WorkerPlan, ready_q, start_evt, t0_val, stats_q) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal()

    async def wait_start():
        await asyncio.get_running_loop().run_in_executor(None, start_evt.wait)
        return t0_val.value

    stats = asyncio.run(Worker(plan).run(lambda: ready_q.put(plan.wid), wait_start))
    stats_q.put(stats)
