"""The gateway's HTTP server: one OpenAI URL over the ready instances of its runs, with the client key checked.

Every route but /health needs `Authorization: Bearer <the gateway's key>` (401
otherwise); the engine gets its own run's key instead, so a client never holds an
engine's key and one gateway can front runs with different keys. A request is
routed by its `model` (a served model or a LoRA adapter) to a ready instance
chosen by the policy; if that instance fails before the first byte of its answer
(refused, reset, 502/503/504), the request goes to the next one, so a client sees
nothing of an instance dying before its first token. The answer is streamed back
as it comes. /v1/models lists what is served; /metrics has the gateway's series
(requests, retries, per-instance in flight); /aegis/status the routing table.
Each followed run gets a status file (RunDir.gateway_status) with this gateway's
URL and per-instance in-flight counts: `aegis drain` and the head's shutdown read
it to know when drained instances are idle.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from aegis.gateway.backends import Backend, Pool
from aegis.gateway.policy import Chooser
from aegis.util.fs import atomic_write

log = logging.getLogger("aegis.gateway")
POLL_SECONDS = 0.2  # how often the runs' files are checked for changes (a stat each)
STATUS_SECONDS = 0.5  # the status files are rewritten at most this often while something changes
HEARTBEAT_SECONDS = 5.0  # ... and at least this often (readers ignore a file older than STALE_SECONDS)
STALE_SECONDS = 15.0
FAIL_SKIP_SECONDS = 2.0  # an instance that refused a connection is tried last for this long
RETRYABLE = (502, 503, 504)
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length", "authorization"}


def _error(status: int, message: str, kind: str, code: str | None = None) -> web.Response:
    """An OpenAI-shaped error answer."""
    body = {"error": {"message": message, "type": kind, "code": code}, "object": "error"}
    headers = {"Retry-After": "2"} if status == 503 else None
    return web.json_response(body, status=status, headers=headers)


class Gateway:
    """The proxy, its routing table and its bookkeeping."""

    def __init__(self, pool: Pool, key: str, policy: str = "cache_aware", max_tries: int = 3,
                 connect_timeout: float = 5.0, echo=None):
        self.pool = pool
        self.key = key.encode()
        self.chooser = Chooser(policy)
        self.max_tries = max_tries
        self.connect_timeout = connect_timeout
        self.echo = echo or (lambda msg: None)
        self.url = ""
        self.session: aiohttp.ClientSession | None = None
        self.inflight: dict[tuple[str, str], int] = defaultdict(int)  # (run, instance) -> requests in flight
        self.served: dict[tuple[str, str], int] = defaultdict(int)
        self.idle_said: set[tuple[str, str]] = set()
        self.registry = CollectorRegistry()
        self.requests = Counter("aegis_gateway_requests", "Requests answered, by model and HTTP status",
                                ["model", "code"], registry=self.registry)
        self.retries = Counter("aegis_gateway_retries", "Requests sent again to another instance after a failure "
                               "before the first byte", registry=self.registry)
        self.registry.register(_InflightCollector(self))
        self._status_written: dict[str, tuple] = {}

    # -- the app -------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=512 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/aegis/status", self.status)
        app.router.add_route("POST", "/{tail:.*}", self.proxy)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _start(self, app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                                             timeout=timeout, auto_decompress=False)
        app["aegis_poller"] = asyncio.create_task(self._poll_forever())

    async def _cleanup(self, app: web.Application) -> None:
        app["aegis_poller"].cancel()
        if self.session is not None:
            await self.session.close()
        for f in self.pool.followers:
            self._status_path(f.run).unlink(missing_ok=True)

    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), self.key)

    # -- routes --------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        ready = len(self.pool.backends())
        return web.json_response({"ready_instances": ready}, status=200 if ready else 503)

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "missing or wrong API key (send Authorization: Bearer <key>)", "authentication_error")
        created = int(time.time())
        data = []
        for name in sorted(self.pool.by_name):
            base = self.pool.adapters.get(name)
            data.append({"id": name, "object": "model", "created": created, "owned_by": "aegis",
                         "root": name if base is None else name, "parent": base,
                         "instances": len(self.pool.by_name[name])})
        return web.json_response({"object": "list", "data": data})

    async def metrics(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "missing or wrong API key", "authentication_error")
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def status(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "missing or wrong API key", "authentication_error")
        return web.json_response(self.snapshot())

    def snapshot(self) -> dict:
        runs = []
        for f in self.pool.followers:
            run = str(f.run.path)
            every, drained = f.drain
            runs.append({"run": run, "state": f.doc.state.value, "instances": [
                {"name": i.name, "model": i.model, "url": i.url, "status": i.status.value,
                 "draining": every or i.name in drained, "serving": any(b.name == i.name for b in f.backends),
                 "inflight": self.inflight.get((run, i.name), 0), "served": self.served.get((run, i.name), 0)}
                for i in f.doc.instances]})
        return {"url": self.url, "pid": os.getpid(), "runs": runs}

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return _error(401, "missing or wrong API key (send Authorization: Bearer <key>)", "authentication_error")
        body = await request.read()
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            return _error(400, "the request body is not JSON", "invalid_request_error")
        if not isinstance(doc, dict):
            return _error(400, "the request body is not a JSON object", "invalid_request_error")
        model = doc.get("model")
        if not model:
            bases = sorted({b.model for b in self.pool.backends()})
            if len(bases) != 1:
                return _error(400, f"say which model: one of {', '.join(self.pool.known_models()) or 'none yet'}",
                              "invalid_request_error")
            model = bases[0]
        candidates = self.pool.by_name.get(model)
        if not candidates:
            known = self.pool.known_models()
            if model in known:
                self.requests.labels(model, "503").inc()
                return _error(503, f"no instance of {model!r} is ready (starting, restarting, draining or "
                              "stopped); try again", "service_unavailable")
            self.requests.labels(model, "404").inc()
            return _error(404, f"the model {model!r} does not exist here; served: {', '.join(known) or 'none'}",
                          "invalid_request_error", "model_not_found")
        order = self.chooser.order(candidates, doc, limit=self.max_tries)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        path = request.raw_path
        last = ""
        for attempt, backend in enumerate(order):
            if attempt:
                self.retries.inc()
            result = await self._forward(request, backend, path, body, headers, final=attempt == len(order) - 1)
            if isinstance(result, web.StreamResponse):
                self.requests.labels(model, str(result.status)).inc()
                return result
            last = result
        self.requests.labels(model, "502").inc()
        return _error(502, f"every instance tried failed ({len(order)}); last: {last}", "upstream_error")

    async def _forward(self, request: web.Request, backend: Backend, path: str, body: bytes,
                       headers: dict[str, str], final: bool) -> web.StreamResponse | str:
        """Send to one instance; the client's response, or why it failed before its first byte (then retried)."""
        assert self.session is not None
        slot = (backend.run, backend.name)
        backend.inflight += 1
        self.inflight[slot] += 1
        if backend.key:
            headers = {**headers, "Authorization": f"Bearer {backend.key}"}
        resp: web.StreamResponse | None = None
        try:
            async with self.session.post(backend.url + path, data=body, headers=headers) as up:
                if up.status in RETRYABLE and not final:
                    return f"{backend.ident} answered {up.status}"
                first = await up.content.readany()  # nothing goes to the client before the first byte
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in _HOP:
                        resp.headers[k] = v
                if up.content_length is not None:
                    resp.content_length = up.content_length
                await resp.prepare(request)
                if first:
                    await resp.write(first)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                self.served[slot] += 1
                return resp
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            if resp is not None and resp.prepared:
                raise  # the answer had begun: it cannot be sent again (the client sees a broken stream)
            backend.failed_until = time.monotonic() + FAIL_SKIP_SECONDS
            return f"{backend.ident}: {type(exc).__name__}: {exc}"
        finally:
            backend.inflight -= 1
            self.inflight[slot] -= 1

    # -- following the runs --------------------------------------------------------------

    async def _poll_forever(self) -> None:
        last_status = 0.0
        while not self.url:  # the status files carry the URL: written once it listens
            await asyncio.sleep(0.01)
        while True:
            try:
                if self.pool.poll():
                    self.echo(self._summary())
                now = time.monotonic()
                if now - last_status >= STATUS_SECONDS:
                    last_status = now
                    self._write_status()
            except Exception as exc:  # the data path must outlive a bad file or a full filesystem
                log.warning("gateway bookkeeping: %s", exc)
            await asyncio.sleep(POLL_SECONDS)

    def _summary(self) -> str:
        counts = {name: len(bs) for name, bs in sorted(self.pool.by_name.items())}
        told = ", ".join(f"{n} x {m}" for m, n in counts.items()) or "no ready instance"
        return f"aegis gateway: serving {told}"

    def _status_path(self, run) -> Path:
        return run.gateway_status(socket.gethostname(), os.getpid())

    def _write_status(self) -> None:
        """Each run's status file: this gateway's URL and its in-flight counts (when changed, and a heartbeat)."""
        now = time.time()
        for f in self.pool.followers:
            run = str(f.run.path)
            every, drained = f.drain
            counts = {i.name: self.inflight.get((run, i.name), 0) for i in f.doc.instances}
            for name, n in counts.items():
                slot = (run, name)
                if (every or name in drained) and n == 0 and slot not in self.idle_said:
                    self.idle_said.add(slot)
                    self.echo(f"aegis gateway: {f.run.path.name}/{name} is drained and idle")
            key = (tuple(sorted(counts.items())), every, drained, f.doc.state)
            prev = self._status_written.get(run)
            if prev is not None and prev[0] == key and now - prev[1] < HEARTBEAT_SECONDS:
                continue
            try:
                f.run.gateways.mkdir(exist_ok=True)
                atomic_write(self._status_path(f.run), json.dumps(
                    {"url": self.url, "pid": os.getpid(), "host": socket.gethostname(), "updated": now,
                     "inflight": counts}) + "\n", mode=0o600)
                self._status_written[run] = (key, now)
            except OSError as exc:
                log.warning("cannot write %s: %s", self._status_path(f.run), exc)


class _InflightCollector:
    """Per-instance in-flight counts as a gauge, read when scraped."""

    def __init__(self, gw: Gateway):
        self.gw = gw

    def collect(self):
        g = GaugeMetricFamily("aegis_gateway_inflight", "Requests in flight per instance", labels=["instance"])
        for (run, name), n in sorted(self.gw.inflight.items()):
            g.add_metric([f"{Path(run).name}/{name}"], n)
        yield g
        r = GaugeMetricFamily("aegis_gateway_ready_instances", "Instances taking requests, per model or adapter",
                              labels=["model"])
        for name, bs in sorted(self.gw.pool.by_name.items()):
            r.add_metric([name], len(bs))
        yield r


def gateway_inflight(run, since: float = 0.0) -> tuple[dict[str, int] | None, bool]:
    """Requests in flight per instance of `run` over every live gateway following it (None: no gateway does),
    and whether a live gateway has not reported since `since` (a unix time) yet."""
    total: dict[str, int] = {}
    found = waiting = False
    now = time.time()
    try:
        files = sorted(run.gateways.glob("*.json"))
    except OSError:
        return None, False
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or now - float(data.get("updated", 0)) > STALE_SECONDS:
            continue
        if data.get("host") == socket.gethostname() and not psutil.pid_exists(int(data.get("pid", 0))):
            continue  # a gateway of this host that is gone (killed: it could not remove its file)
        found = True
        waiting |= float(data.get("updated", 0)) < since
        for name, n in (data.get("inflight") or {}).items():
            total[name] = total.get(name, 0) + int(n)
    return (total if found else None), waiting
