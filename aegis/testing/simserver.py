"""A simulated OpenAI-compatible LLM server (continuous batching) that exposes its true timings.

It models a vLLM-like engine: slots (max running sequences), a waiting queue,
prefill time per uncached prompt token, a decode step per token, a prefix cache
over full KV blocks, KV-block exhaustion with preemption, and LoRA adapters
with a limited number per batch, a resident set and a swap cost. It serves
/v1/completions, /v1/chat/completions (streaming or not, usage and continuous
usage), /v1/models, /tokenize, /detokenize, /health and /metrics with vLLM's
metric names, and GET /sim/truth: the server-side timestamps of every finished
request (time.perf_counter(), i.e. CLOCK_MONOTONIC, comparable across
processes on one Linux machine), keyed by the X-Request-Id header: `received`
(when the server's event loop read the request's first bytes off its socket),
`arrival` (when its handler started: after aiohttp parsed it and, with several
requests read at once, after the handlers of those before it), `admitted`,
`first_token`, `token_times`, `finish`.

Run: python -m aegis.testing.simserver --port 8000 [--max-num-seqs 64 ...]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from aegis.util.signals import until_stopped

perf = time.perf_counter
_PIECE = re.compile(r"\s*\S{1,4}|\s+")
KEY_ENV = "AEGIS_SIM_API_KEY"  # the engine's key variable (aegis.engines.sim)
_OUT_PIECES = [" " + c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass
class SimConfig:
    """Engine and server parameters of the simulator."""

    model: str = "sim-model"
    max_num_seqs: int = 64
    prefill_ms_per_token: float = 0.02
    decode_ms: float = 8.0
    decode_ms_per_seq: float = 0.01
    tokens_per_chunk: int = 1
    kv_blocks: int = 16384
    block_size: int = 16
    prefix_cache: bool = True
    lora_modules: list[str] = field(default_factory=list)
    max_loras: int = 2
    max_cpu_loras: int = 4
    lora_swap_ms: float = 20.0
    api_key: str | None = None
    max_model_len: int = 32768
    fail_every: int = 0
    disconnect_every: int = 0
    legacy_metrics: bool = False
    truth_capacity: int = 200000
    stall_after: int = 0  # a fault: after this many requests the engine counts no token (HTTP still answers)


class Tokenizer:
    """Pieces of at most 4 non-space characters (leading spaces attached); exact round trip."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.pieces: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in _PIECE.findall(text):
            i = self.ids.get(piece)
            if i is None:
                i = self.ids[piece] = len(self.pieces)
                self.pieces.append(piece)
            out.append(i)
        return out

    def decode(self, ids: list[int]) -> str:
        n = len(self.pieces)
        return "".join(self.pieces[i] if 0 <= i < n else "" for i in ids)


class SimRequest:
    """One request inside the engine, with its true timestamps."""

    __slots__ = ("rid", "prompt_ids", "prompt_tokens", "max_tokens", "adapter", "queue", "generated",
                 "received", "arrival", "admitted", "first_token", "token_times", "finish", "cached_tokens",
                 "preemptions", "blocks", "done")

    def __init__(self, rid, prompt_ids, max_tokens, adapter, arrival, received=None):
        self.rid, self.prompt_ids, self.max_tokens, self.adapter = rid, prompt_ids, max_tokens, adapter
        self.prompt_tokens = len(prompt_ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.generated = 0
        self.arrival = arrival
        self.received = arrival if received is None else received
        self.admitted = self.first_token = self.finish = None
        self.token_times: list[float] = []
        self.cached_tokens = 0
        self.preemptions = 0
        self.blocks = 0
        self.done = False


class Engine:
    """Continuous batching over `max_num_seqs` slots, one decode step at a time."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.waiting: collections.deque[SimRequest] = collections.deque()
        self.running: list[SimRequest] = []
        self.free_blocks = cfg.kv_blocks
        self.cache: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.resident: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.wake = asyncio.Event()
        self.counters: collections.Counter[str] = collections.Counter()
        self.task: asyncio.Task | None = None
        self.added = 0

    def add(self, r: SimRequest) -> None:
        self.waiting.append(r)
        self.added += 1
        self.wake.set()

    def abort(self, r: SimRequest) -> None:
        if r in self.running:
            self.running.remove(r)
            self.free_blocks += r.blocks
            r.blocks = 0
        elif r in self.waiting:
            self.waiting.remove(r)
        r.done = True

    def _block_hashes(self, ids: list[int]) -> list[int]:
        bs, h, out = self.cfg.block_size, 0, []
        for start in range(0, len(ids) - bs + 1, bs):
            h = hash((h, tuple(ids[start:start + bs])))
            out.append(h)
        return out

    def _admit(self) -> tuple[int, float]:
        """Move waiting requests into free slots; returns (prefill tokens, swap ms)."""
        cfg, prefill, swap = self.cfg, 0, 0.0
        running_adapters = {r.adapter for r in self.running if r.adapter}
        skipped: collections.deque[SimRequest] = collections.deque()
        while self.waiting and len(self.running) < cfg.max_num_seqs:
            r = self.waiting.popleft()
            if r.adapter and r.adapter not in running_adapters and len(running_adapters) >= cfg.max_loras:
                skipped.append(r)
                continue
            total = r.prompt_tokens + r.generated
            need = math.ceil((total + 1) / cfg.block_size)
            if need > self.free_blocks:
                skipped.append(r)
                break
            self.free_blocks -= need
            r.blocks = need
            cached = 0
            hashes = self._block_hashes(r.prompt_ids)
            if cfg.prefix_cache:
                # like vLLM: the last prompt token is always computed, so hits stop one token short
                for h in hashes[:(r.prompt_tokens - 1) // cfg.block_size]:
                    if h not in self.cache:
                        break
                    self.cache.move_to_end(h)
                    cached += cfg.block_size
                self.counters["prefix_queries"] += r.prompt_tokens
                self.counters["prefix_hits"] += max(cached, 0)
                for h in hashes:
                    self.cache[h] = None
                    self.cache.move_to_end(h)
                while len(self.cache) > cfg.kv_blocks:
                    self.cache.popitem(last=False)
            if r.admitted is None:
                r.admitted = perf()
                r.cached_tokens = max(cached, 0)
                self.counters["prompt_tokens"] += r.prompt_tokens
            prefill += total - max(cached, 0)
            if r.adapter:
                running_adapters.add(r.adapter)
                if r.adapter in self.resident:
                    self.resident.move_to_end(r.adapter)
                else:
                    swap += cfg.lora_swap_ms
                    self.counters["lora_swaps"] += 1
                    self.resident[r.adapter] = None
                    while len(self.resident) > cfg.max_cpu_loras:
                        self.resident.popitem(last=False)
            self.running.append(r)
        skipped.extend(self.waiting)
        self.waiting = skipped
        return prefill, swap

    def _preempt_newest(self) -> None:
        victim = self.running.pop()
        self.free_blocks += victim.blocks
        victim.blocks = 0
        victim.preemptions += 1
        self.counters["preemptions"] += 1
        self.waiting.appendleft(victim)

    async def loop(self) -> None:
        cfg = self.cfg
        while True:
            if not self.running and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            if cfg.stall_after and self.added > cfg.stall_after:
                self._admit()  # requests show as running, as in a stuck engine core; none ever advances
                await asyncio.Event().wait()
            prefill, swap = self._admit()
            if not self.running:
                await asyncio.sleep(0.001)
                continue
            step_ms = cfg.decode_ms + cfg.decode_ms_per_seq * len(self.running) \
                + cfg.prefill_ms_per_token * prefill + swap
            await asyncio.sleep(step_ms / 1000.0)
            finished = []
            for r in list(self.running):
                if r.done or r not in self.running:
                    continue
                n = min(cfg.tokens_per_chunk, r.max_tokens - r.generated)
                total = r.prompt_tokens + r.generated + n
                while total > r.blocks * cfg.block_size:
                    if self.free_blocks > 0:
                        self.free_blocks -= 1
                        r.blocks += 1
                    elif self.running[-1] is not r:
                        self._preempt_newest()
                    else:
                        break
                if r not in self.running:
                    continue
                if total > r.blocks * cfg.block_size:
                    self._preempt_newest()
                    continue
                r.generated += n
                self.counters["generation_tokens"] += n
                last = r.generated >= r.max_tokens
                r.queue.put_nowait((n, last))
                if last:
                    finished.append(r)
            for r in finished:
                self.running.remove(r)
                self.free_blocks += r.blocks
                r.blocks = 0
                r.done = True
                self.counters["success"] += 1

    def kv_usage(self) -> float:
        return 1.0 - self.free_blocks / self.cfg.kv_blocks


class _Collector:
    """vLLM-named metrics of the simulated engine."""

    def __init__(self, server: SimServer):
        self.s = server

    def collect(self):
        e, cfg = self.s.engine, self.s.cfg
        lab, val = ["model_name", "engine"], [cfg.model, "0"]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(name, doc, labels=lab)
            g.add_metric(val, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(name, doc, labels=lab)
            c.add_metric(val, v)
            return c
        yield gauge("vllm:num_requests_running", "Running requests", len(e.running))
        yield gauge("vllm:num_requests_waiting", "Waiting requests", len(e.waiting))
        legacy = cfg.legacy_metrics
        yield gauge("vllm:gpu_cache_usage_perc" if legacy else "vllm:kv_cache_usage_perc", "KV usage",
                    e.kv_usage())
        yield counter("vllm:num_preemptions", "Preemptions", e.counters["preemptions"])
        pre = "vllm:gpu_prefix_cache_" if legacy else "vllm:prefix_cache_"
        yield counter(pre + "queries", "Prefix cache queries (tokens)", e.counters["prefix_queries"])
        yield counter(pre + "hits", "Prefix cache hits (tokens)", e.counters["prefix_hits"])
        yield counter("vllm:prompt_tokens", "Prefill tokens", e.counters["prompt_tokens"])
        yield counter("vllm:generation_tokens", "Generated tokens", e.counters["generation_tokens"])
        yield counter("vllm:request_success", "Finished requests", e.counters["success"])
        if cfg.lora_modules:
            g = GaugeMetricFamily("vllm:lora_requests_info", "LoRA requests",
                                  labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            running = sorted({r.adapter for r in e.running if r.adapter})
            waiting = sorted({r.adapter for r in e.waiting if r.adapter})
            g.add_metric([str(cfg.max_loras), ",".join(waiting), ",".join(running)], time.time())
            yield g


def _json(obj, status=200):
    return web.Response(text=json.dumps(obj), status=status, content_type="application/json")


def _error(message, status, typ="BadRequestError"):
    return _json({"error": {"message": message, "type": typ, "code": status}}, status)


class _Stamped(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind a forwarder that notes when the server first read the
    bytes of each request (the truth's `received`): the first read after the previous request's body was
    taken. aiohttp parses the request and starts its handler later (a loop turn or more; after the other
    handlers when several requests were read at once), which is `arrival`."""

    def __init__(self, inner: asyncio.Protocol, conns: dict):
        self.inner, self.conns = inner, conns
        self.transport: asyncio.BaseTransport | None = None
        self.first: float | None = None    # the pending request's first read
        self.busy = False                   # its handler is reading its body: later reads are that body's

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conns[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.first is None and not self.busy:
            self.first = perf()
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def connection_lost(self, exc) -> None:
        self.conns.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class SimServer:
    """The aiohttp application around an Engine."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.engine = Engine(cfg)
        self.tok = Tokenizer()
        self.truth: collections.deque = collections.deque(maxlen=cfg.truth_capacity)
        self.n_requests = 0
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        self.conns: dict = {}   # transport -> _Stamped, when serve() made the listening socket

    def protocol(self, server: web.Server) -> _Stamped:
        """A protocol factory for loop.create_server: aiohttp's, stamping reads for `received`."""
        return _Stamped(server(), self.conns)

    @web.middleware
    async def _received(self, request: web.Request, handler):
        """Claims the connection's first-read stamp for this request (request["received"]), reads the body,
        then lets the next read stamp the next request. request["arrival"]: the handler's start, before that."""
        request["arrival"] = perf()
        conn = self.conns.get(request.transport)
        if conn is None:
            request["received"] = None
            return await handler(request)
        request["received"], conn.first, conn.busy = conn.first, None, True
        try:
            await request.read()
        finally:
            conn.first, conn.busy = None, False
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30, middlewares=[self._received])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/sim/truth", self.get_truth)
        app.router.add_post("/sim/reset", self.reset)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app):
        self.engine.task = asyncio.create_task(self.engine.loop())

    async def _stop(self, app):
        if self.engine.task:
            self.engine.task.cancel()

    def _authorized(self, request) -> bool:
        return not self.cfg.api_key or request.headers.get("Authorization") == f"Bearer {self.cfg.api_key}"

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request):
        if not self._authorized(request):
            return _error("Unauthorized", 401, "Unauthorized")
        data = [{"id": self.cfg.model, "object": "model", "root": self.cfg.model, "parent": None,
                 "max_model_len": self.cfg.max_model_len}]
        data += [{"id": a, "object": "model", "root": f"/adapters/{a}", "parent": self.cfg.model}
                 for a in self.cfg.lora_modules]
        return _json({"object": "list", "data": data})

    async def tokenize(self, request):
        body = await request.json()
        if "messages" in body:
            ids = self._chat_ids(body["messages"])
        else:
            ids = self.tok.encode(body.get("prompt", ""))
        return _json({"count": len(ids), "max_model_len": self.cfg.max_model_len, "tokens": ids,
                      "token_strs": None})

    async def detokenize(self, request):
        body = await request.json()
        return _json({"prompt": self.tok.decode(body.get("tokens", []))})

    async def metrics(self, request):
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def get_truth(self, request):
        return _json(list(self.truth))

    async def reset(self, request):
        self.truth.clear()
        return _json({"ok": True})

    def _chat_ids(self, messages) -> list[int]:
        text = "".join(f"<|{m.get('role', 'user')}|>{m.get('content') if isinstance(m.get('content'), str) else ''}"
                       for m in messages if isinstance(m, dict)) + "<|assistant|>"
        return self.tok.encode(text)

    async def generate(self, request):
        arrival = request.get("arrival") or perf()
        if not self._authorized(request):
            return _error("Unauthorized", 401, "Unauthorized")
        try:
            body = await request.json()
        except ValueError:
            return _error("request body is not JSON", 400)
        chat = request.path.endswith("/chat/completions")
        model = body.get("model", self.cfg.model)
        if model != self.cfg.model and model not in self.cfg.lora_modules:
            return _error(f"The model `{model}` does not exist.", 404, "NotFoundError")
        self.n_requests += 1
        if self.cfg.fail_every and self.n_requests % self.cfg.fail_every == 0:
            return _error("simulated internal error", 500, "InternalServerError")
        if chat:
            ids = self._chat_ids(body.get("messages") or [])
        else:
            prompt = body.get("prompt", "")
            if isinstance(prompt, list):
                prompt = prompt[0] if prompt and isinstance(prompt[0], str) else prompt
            ids = list(prompt) if isinstance(prompt, list) else self.tok.encode(prompt)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        if len(ids) + max_tokens > self.cfg.max_model_len:
            return _error(f"This model's maximum context length is {self.cfg.max_model_len} tokens. "
                          f"However, you requested {len(ids) + max_tokens} tokens.", 400)
        if math.ceil((len(ids) + max_tokens + 1) / self.cfg.block_size) > self.cfg.kv_blocks:
            return _error(f"the request needs more KV cache than the server has ({self.cfg.kv_blocks} blocks "
                          f"of {self.cfg.block_size} tokens)", 400)
        rid = request.headers.get("X-Request-Id") or f"sim-{uuid.uuid4().hex}"
        r = SimRequest(rid, ids, int(max_tokens), model if model != self.cfg.model else None, arrival,
                       request.get("received"))
        disconnect = bool(self.cfg.disconnect_every and self.n_requests % self.cfg.disconnect_every == 0)
        self.engine.add(r)
        try:
            if body.get("stream"):
                return await self._stream(request, r, body, chat, model, disconnect)
            return await self._whole(r, chat, model)
        except ConnectionError:  # the client went away (a timeout on its side)
            return web.Response(status=499)
        finally:
            if not r.done:
                self.engine.abort(r)

    def _usage(self, r: SimRequest) -> dict:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generated,
                "total_tokens": r.prompt_tokens + r.generated}

    def _record(self, r: SimRequest) -> None:
        self.truth.append({
            "request_id": r.rid, "received": r.received, "arrival": r.arrival, "admitted": r.admitted,
            "first_token": r.first_token, "token_times": r.token_times, "finish": r.finish,
            "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens, "output_tokens": r.generated,
            "adapter": r.adapter, "preemptions": r.preemptions})

    async def _whole(self, r: SimRequest, chat: bool, model: str):
        text: list[str] = []
        while True:
            n, last = await r.queue.get()
            text.extend(_OUT_PIECES[(len(text) + k) % len(_OUT_PIECES)] for k in range(n))
            if last:
                break
        r.first_token = r.finish = perf()
        r.token_times = [r.finish]
        self._record(r)
        choice = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return _json({"id": r.rid, "object": "chat.completion" if chat else "text_completion",
                      "created": int(time.time()), "model": model, "choices": [choice],
                      "usage": self._usage(r)})

    async def _stream(self, request, r: SimRequest, body: dict, chat: bool, model: str, disconnect: bool):
        so = body.get("stream_options") or {}
        include_usage, continuous = bool(so.get("include_usage")), bool(so.get("continuous_usage_stats"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def chunk(text, finish, usage=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                          "stop_reason": None}
            d = {"id": r.rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            if continuous:
                d["usage"] = usage
            return b"data: " + json.dumps(d).encode() + b"\n\n"

        first, written = True, 0
        while True:
            n, last = await r.queue.get()
            text = "".join(_OUT_PIECES[(written + k) % len(_OUT_PIECES)] for k in range(n))
            written += n
            data = b""
            if first and chat:
                data += chunk("", None, {"prompt_tokens": r.prompt_tokens, "completion_tokens": 0,
                                         "total_tokens": r.prompt_tokens}, role=True)
            usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": written,
                     "total_tokens": r.prompt_tokens + written}
            data += chunk(text, "length" if last else None, usage)
            # stamped just before the write: the client cannot see the token earlier
            now = perf()
            r.token_times.append(now)
            await resp.write(data)
            if first:
                r.first_token = now
                first = False
                if disconnect:
                    if request.transport is not None:
                        request.transport.abort()
                    self.engine.abort(r)
                    return resp
            if last:
                break
        if include_usage:
            d = {"id": r.rid, "object": obj, "created": created, "model": model, "choices": [],
                 "usage": self._usage(r)}
            await resp.write(b"data: " + json.dumps(d).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        r.finish = perf()
        self._record(r)
        await resp.write_eof()
        return resp


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting (for checking a config's extra_args)."""

    def error(self, message):
        raise _ArgError(message)


def arg_error(args: list[str]) -> str | None:
    """Why the simulator refuses these flags (one line), or None; --host/--port/--model are aegis's."""
    try:
        _parser(_Parser).parse_args(list(args))
    except _ArgError as exc:
        return str(exc)
    taken = [f for f in ("--host", "--port") if any(x == f or x.startswith(f + "=") for x in args)]
    if taken:
        return f"{taken[0]} is set by aegis from the plan; remove it"
    return None


def _parser(cls=argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = cls(prog="python -m aegis.testing.simserver", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    d = SimConfig()
    for name in ("model", "max_num_seqs", "prefill_ms_per_token", "decode_ms", "decode_ms_per_seq",
                 "tokens_per_chunk", "kv_blocks", "block_size", "max_loras", "max_cpu_loras", "lora_swap_ms",
                 "max_model_len", "fail_every", "disconnect_every", "truth_capacity", "stall_after"):
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=getattr(d, name))
    p.add_argument("--lora-modules", default="", help="comma-separated adapter names")
    p.add_argument("--api-key-file", default=None, help="require this Bearer key on /v1/*")
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--legacy-metrics", action="store_true", help="older vLLM metric names (gpu_*)")
    p.add_argument("--startup-seconds", type=float, default=0.0,
                   help="pretend to load weights for this long before serving (logged like vLLM)")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, SimConfig]:
    a = _parser().parse_args(argv)
    key = os.environ.get(KEY_ENV) or None  # how aegis hands it over: never on a command line
    if a.api_key_file:
        with open(a.api_key_file) as fh:
            key = fh.readline().strip()
    cfg = SimConfig(**{k: getattr(a, k) for k in (
        "model", "max_num_seqs", "prefill_ms_per_token", "decode_ms", "decode_ms_per_seq", "tokens_per_chunk",
        "kv_blocks", "block_size", "max_loras", "max_cpu_loras", "lora_swap_ms", "max_model_len",
        "fail_every", "disconnect_every", "truth_capacity", "legacy_metrics", "stall_after")},
        lora_modules=[x for x in a.lora_modules.split(",") if x], api_key=key,
        prefix_cache=not a.no_prefix_cache)
    return a, cfg


def say(line: str, stream) -> None:
    """A log line; lost, not fatal, when the log's filesystem is full (as a server's logging would do)."""
    try:
        print(line, file=stream, flush=True)
    except OSError:
        pass


async def serve(host: str, port: int, cfg: SimConfig, startup_seconds: float = 0.0) -> None:
    t0 = perf()
    if startup_seconds > 0:
        await asyncio.sleep(startup_seconds)
    # The line aegis reads for the "loaded" startup phase, as vLLM's model loader prints it.
    say(f"INFO simserver: Loading weights took {perf() - t0:.2f} seconds", sys.stderr)
    sim = SimServer(cfg)
    runner = web.AppRunner(sim.app(), access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None  # set by setup()
    server = runner.server
    # the listening socket aiohttp's TCPSite would make, with each connection's protocol behind _Stamped
    listener = await asyncio.get_running_loop().create_server(lambda: sim.protocol(server), host, port,
                                                              backlog=4096, reuse_address=True)
    actual = listener.sockets[0].getsockname()[1]
    say(f"SIMSERVER READY http://{host}:{actual}", sys.stdout)
    await until_stopped()
    listener.close()
    await runner.cleanup()


def main(argv=None) -> None:
    a, cfg = parse_args(argv)
    asyncio.run(serve(a.host, a.port, cfg, a.startup_seconds))


class SimProcess:
    """Starts the simulator in a subprocess on a free loopback port (for tests and benchmarks)."""

    def __init__(self, *args: str, python: str = sys.executable, env: dict | None = None):
        self.args, self.python, self.env = list(args), python, env
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> SimProcess:
        env = dict(os.environ if self.env is None else self.env)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([self.python, "-m", "aegis.testing.simserver", "--port", "0", *self.args],
                                     stdout=subprocess.PIPE, env=env, text=True)
        assert self.proc.stdout is not None  # stdout=PIPE
        line = self.proc.stdout.readline()
        if not line.startswith("SIMSERVER READY "):
            self.close()
            raise RuntimeError(f"simulated server did not start (got {line!r})")
        self.url = line.split()[-1]
        return self

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    main()
