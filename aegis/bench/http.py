"""A lean HTTP/1.1 client on asyncio.Protocol: timestamps bytes as the socket delivers them.

The load path avoids aiohttp: each chunk of a streamed answer is timed inside
`data_received` (no task hop in between), request bytes go out in one write,
keep-alive connections are pooled per host, and nothing caps the size of a
line, header block or body.
"""
from __future__ import annotations

import asyncio
import ssl as _ssl
import time
from urllib.parse import urlsplit

perf = time.perf_counter
MAX_ERROR_BODY = 64 * 1024
CONNECT_TIMEOUT_S = 10.0  # opening a TCP (and TLS) connection; a server that never accepts fails in this long


class HTTPError(Exception):
    """A transport-level failure: `kind` is connect, connect_timeout, disconnect or bad_response."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Exchange:
    """Parses one response (status, headers, then a Content-Length, chunked or close-delimited body)."""

    def __init__(self, on_body, on_status=None):
        self.on_body, self.on_status = on_body, on_status
        self.buf = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.mode = None        # "length" | "chunked" | "close"
        self.remaining = 0
        self.chunk_state = "size"
        self.done = asyncio.get_running_loop().create_future()
        self.keep_alive = True
        self.t_done = 0.0
        self._now = 0.0

    def feed(self, data: bytes, now: float) -> None:
        self.buf += data
        self._now = now
        try:
            self._parse(now)
        except (ValueError, IndexError) as exc:
            if not self.done.done():
                self.done.set_exception(HTTPError("bad_response", f"malformed HTTP response: {exc}"))

    def _finish(self) -> None:
        if not self.done.done():
            self.t_done = self._now or perf()
            self.done.set_result(None)

    def _parse(self, now: float) -> None:
        if self.mode is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            del self.buf[:end + 4]
            parts = head[0].split(" ", 2)
            self.status = int(parts[1])
            for line in head[1:]:
                k, _, v = line.partition(":")
                self.headers[k.strip().lower()] = v.strip()
            if self.headers.get("connection", "").lower() == "close" or parts[0] == "HTTP/1.0":
                self.keep_alive = False
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                self.mode = "chunked"
            elif "content-length" in self.headers:
                self.mode, self.remaining = "length", int(self.headers["content-length"])
            else:
                self.mode, self.keep_alive = "close", False
            if self.on_status:
                self.on_status(self.status)
            if self.mode == "length" and self.remaining == 0:
                self._finish()
                return
        if self.mode == "length":
            take = bytes(self.buf[:self.remaining])
            del self.buf[:len(take)]
            self.remaining -= len(take)
            if take:
                self.on_body(take, now)
            if self.remaining == 0:
                self._finish()
        elif self.mode == "close":
            if self.buf:
                self.on_body(bytes(self.buf), now)
                self.buf.clear()
        else:
            self._parse_chunked(now)

    def _parse_chunked(self, now: float) -> None:
        buf = self.buf
        while True:
            if self.chunk_state == "size":
                nl = buf.find(b"\r\n")
                if nl < 0:
                    return
                size = int(bytes(buf[:nl]).split(b";", 1)[0].strip() or b"0", 16)
                del buf[:nl + 2]
                if size == 0:
                    self.chunk_state = "trailer"
                else:
                    self.chunk_state, self.remaining = "data", size
            elif self.chunk_state == "data":
                if not buf:
                    return
                take = bytes(buf[:self.remaining])
                del buf[:len(take)]
                self.remaining -= len(take)
                self.on_body(take, now)
                if self.remaining:
                    return
                self.chunk_state = "crlf"
            elif self.chunk_state == "crlf":
                if len(buf) < 2:
                    return
                del buf[:2]
                self.chunk_state = "size"
            else:  # trailer: lines until an empty one
                nl = buf.find(b"\r\n")
                if nl < 0:
                    return
                line = bytes(buf[:nl])
                del buf[:nl + 2]
                if not line:
                    self._finish()
                    return

    def lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.mode == "close":
            self._finish()
        else:
            why = f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection mid-answer"
            self.done.set_exception(HTTPError("disconnect", why))


class _Conn(asyncio.Protocol):
    """One keep-alive connection; hands received bytes to the current exchange."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = perf()
        if self.exchange is not None:
            self.exchange.feed(data, now)
        else:  # bytes with no request outstanding: the connection is unusable
            self.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.exchange is not None:
            self.exchange.lost(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections per (scheme, host, port).

    With `spare` > 0 the pool keeps that many idle connections ready: when an
    acquire leaves fewer, new ones are opened in the background, so a growing
    number of requests in flight does not put TCP connects on the send path.
    """

    def __init__(self, spare: int = 0, connect_timeout: float = CONNECT_TIMEOUT_S):
        self.connect_timeout = connect_timeout
        self.idle: dict[tuple, list[_Conn]] = {}
        self._ssl: _ssl.SSLContext | None = None
        self.spare = spare
        self._opening: dict[tuple, int] = {}
        self._tasks: set[asyncio.Task] = set()

    async def _connect(self, key: tuple) -> _Conn:
        scheme, host, port = key
        ssl_ctx = None
        if scheme == "https":
            self._ssl = self._ssl or _ssl.create_default_context()
            ssl_ctx = self._ssl
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Conn, host, port, ssl=ssl_ctx),
                                             self.connect_timeout)
        except asyncio.TimeoutError:  # before OSError: TimeoutError is one (and so is the kernel's ETIMEDOUT)
            raise HTTPError("connect_timeout", f"no connection to {host}:{port} within "
                                               f"{self.connect_timeout:g} s") from None
        except OSError as exc:
            raise HTTPError("connect", f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        return conn

    async def acquire(self, key: tuple) -> tuple[_Conn, bool]:
        idle = self.idle.get(key)
        conn = None
        while idle:
            c = idle.pop()
            assert c.transport is not None  # pooled connections are connected (connection_made ran)
            if not c.closed and not c.transport.is_closing():
                conn = c
                break
        if self.spare:
            self._top_up(key)
        if conn is not None:
            return conn, False
        return await self._connect(key), True

    def _top_up(self, key: tuple) -> None:
        missing = self.spare - len(self.idle.get(key, ())) - self._opening.get(key, 0)
        for _ in range(max(missing, 0)):
            self._opening[key] = self._opening.get(key, 0) + 1
            t = asyncio.get_running_loop().create_task(self._open_spare(key))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _open_spare(self, key: tuple) -> None:
        try:
            conn = await self._connect(key)
            self.idle.setdefault(key, []).append(conn)
        except HTTPError:
            pass
        finally:
            self._opening[key] -= 1

    def release(self, key: tuple, conn: _Conn, reusable: bool) -> None:
        conn.exchange = None
        if reusable and not conn.closed:
            self.idle.setdefault(key, []).append(conn)
        else:
            conn.close()

    async def warm(self, url: str, n: int = 1) -> None:
        """Open `n` idle connections to `url` ahead of time."""
        key = split(url)[0]
        conns = await asyncio.gather(*(self._connect(key) for _ in range(n)), return_exceptions=True)
        for c in conns:
            if isinstance(c, _Conn):
                self.idle.setdefault(key, []).append(c)

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for conns in self.idle.values():
            for c in conns:
                c.close()
        self.idle.clear()


def split(url: str) -> tuple[tuple[str, str | None, int], tuple[str, str]]:
    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return (u.scheme, u.hostname, port), (u.netloc, u.path or "/")


async def request(pool: Pool, method: str, url: str, body: bytes, headers: dict[str, str],
                  on_body, timeout: float, on_status=None) -> dict:
    """Send one request; `on_body(bytes, t)` gets the decoded body as it arrives.

    Returns {"status", "headers", "t_send", "connect_s", "t_done"} (t_done: when the
    last byte of the answer arrived); raises HTTPError
    (connect, connect_timeout, disconnect, bad_response) or asyncio.TimeoutError.
    """
    key, (netloc, path) = split(url)
    head = [f"{method} {path} HTTP/1.1", f"Host: {netloc}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    for attempt in (0, 1):
        t_acq = perf()
        conn, fresh = await pool.acquire(key)
        connect_s = perf() - t_acq if fresh else 0.0
        ex = _Exchange(on_body, on_status)
        conn.exchange = ex
        t_send = perf()
        assert conn.transport is not None  # acquire() hands out connected connections only
        conn.transport.write(data)
        ok = False
        try:
            await asyncio.wait_for(ex.done, timeout)
            ok = True
        except HTTPError as exc:
            # a pooled connection the server had already closed: retry once on a new one
            if exc.kind == "disconnect" and not fresh and ex.status == 0 and attempt == 0:
                continue
            raise
        finally:
            pool.release(key, conn, ok and ex.keep_alive)
        return {"status": ex.status, "headers": ex.headers, "t_send": t_send, "connect_s": connect_s,
                "t_done": ex.t_done}
    raise HTTPError("disconnect", "connection closed before an answer")  # not reached
