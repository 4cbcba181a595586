"""Sends one OpenAI-compatible request and times its stream (TTFT, ITL, E2EL, usage)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from aegis.bench.http import CONNECT_TIMEOUT_S, MAX_ERROR_BODY, HTTPError, Pool, request

perf = time.perf_counter


@dataclass
class RequestOptions:
    """How requests are built: API, streaming, usage options, timeouts."""

    api: str = "completions"
    stream: bool = True
    continuous_usage: bool = True
    ignore_eos: bool = True
    timeout: float = 600.0
    connect_timeout: float = CONNECT_TIMEOUT_S
    extra_body: dict = field(default_factory=dict)


def build_payload(opts: RequestOptions, model: str, prompt: str, output_len: int,
                  messages: list[dict] | None = None) -> dict:
    """The request body; `messages` (chat only): the conversation so far, sent instead of one user message."""
    body: dict = {"model": model}
    if opts.api == "chat":
        body["messages"] = messages if messages is not None else [{"role": "user", "content": prompt}]
        body["max_completion_tokens"] = output_len
    else:
        body["prompt"] = prompt
        body["max_tokens"] = output_len
    if opts.stream:
        body["stream"] = True
        so = {"include_usage": True}
        if opts.continuous_usage:
            so["continuous_usage_stats"] = True
        body["stream_options"] = so
    if opts.ignore_eos:
        body["ignore_eos"] = True
    body.update(opts.extra_body)
    return body


class StreamTimer:
    """Parses an SSE byte stream as it arrives and records token timestamps.

    A chunk carries tokens when its continuous usage count grows, or (without
    usage in the chunk) when it has non-empty text/content. Role-only and
    finish-only chunks and the usage-only final chunk carry none.
    """

    def __init__(self, t_send: float):
        self.t_send = t_send
        self.buf = bytearray()
        self.data_lines: list[bytes] = []
        self.token_times: list[float] = []
        self.chunk_tokens: list[int] = []
        self.text_parts: list[str] = []
        self.reply_parts: list[str] = []  # the answer without reasoning: what a chat client keeps in its history
        self.usage: dict | None = None
        self.usage_tokens = 0       # last cumulative completion_tokens seen
        self.continuous = False
        self.done = False
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.model: str | None = None

    def feed(self, data: bytes, now: float) -> None:
        self.buf += data
        if b"\r" in self.buf:
            # CRLF or CR line ends; a CR at the very end may be half of a CRLF
            tail = b"\r" if self.buf.endswith(b"\r") else b""
            body = bytes(self.buf[:-1] if tail else self.buf)
            self.buf = bytearray(body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail)
        end = self.buf.rfind(b"\n")
        if end < 0:
            return
        lines = bytes(self.buf[:end]).split(b"\n")
        del self.buf[:end + 1]
        for line in lines:
            if not line:
                self._dispatch(now)
            elif line.startswith(b"data:"):
                self.data_lines.append(line[5:].lstrip(b" "))
            # comments (":") and other fields (event:, id:, retry:) carry no tokens

    def finish(self, now: float) -> None:
        if self.buf.strip():
            self.feed(b"\n", now)
        self._dispatch(now)

    def _dispatch(self, now: float) -> None:
        if not self.data_lines:
            return
        payload = b"\n".join(self.data_lines)
        self.data_lines = []
        if payload.strip() == b"[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            self.error = "bad_response: undecodable stream chunk"
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj and not obj.get("choices"):
            err = obj["error"]
            self.error = "stream_error: " + (err.get("message", "") if isinstance(err, dict) else str(err))[:200]
            return
        self.model = obj.get("model", self.model)
        n_tokens = 0
        usage = obj.get("usage")
        choices = obj.get("choices") or []
        text = reply = ""
        for ch in choices:
            delta = ch.get("delta") or ch.get("message") or {}
            answer = (ch.get("text") or "") + (delta.get("content") or "")
            reply += answer
            text += answer + (delta.get("reasoning_content") or "") + (delta.get("reasoning") or "")
            if ch.get("finish_reason"):
                self.finish_reason = ch["finish_reason"]
        if usage and isinstance(usage.get("completion_tokens"), int):
            self.usage = usage
            if choices:
                self.continuous = True
                n_tokens = max(usage["completion_tokens"] - self.usage_tokens, 0)
                self.usage_tokens = usage["completion_tokens"]
        if not n_tokens and text and not (usage and choices):
            n_tokens = 1
        if text:
            self.text_parts.append(text)
        if reply:
            self.reply_parts.append(reply)
        if n_tokens:
            self.token_times.append(now)
            self.chunk_tokens.append(n_tokens)


def _error(kind: str, msg: str) -> tuple[str, str]:
    return kind, f"{kind}: {msg}"[:300]


async def send(pool: Pool, url: str, opts: RequestOptions, model: str, prompt: str, output_len: int,
               headers: dict[str, str], messages: list[dict] | None = None) -> dict:
    """Send one request; returns timing and outcome (never raises, except cancellation)."""
    path = "/v1/chat/completions" if opts.api == "chat" else "/v1/completions"
    body = json.dumps(build_payload(opts, model, prompt, output_len, messages)).encode()
    hdrs = {"Content-Type": "application/json", "Accept": "text/event-stream" if opts.stream else
            "application/json", **headers}
    timer = StreamTimer(0.0)
    raw = bytearray()
    state = {"status": 0}

    def on_body(data: bytes, now: float) -> None:
        if state["status"] == 200 and opts.stream:
            timer.feed(data, now)
        elif len(raw) < MAX_ERROR_BODY or state["status"] == 200:
            raw.extend(data)

    def on_status(code: int) -> None:
        state["status"] = code

    kind = err = None
    t_send = t_end = perf()
    connect_s = 0.0
    try:
        res = await request(pool, "POST", url + path, body, hdrs, on_body, opts.timeout, on_status)
        t_send, connect_s = res["t_send"], res["connect_s"]
        now = t_end = res["t_done"]
        if res["status"] != 200:
            text = bytes(raw[:400]).decode("utf-8", "replace").strip().replace("\n", " ")
            kind, err = _error(f"http_{res['status']}", text)
        elif opts.stream:
            timer.finish(now)
        else:
            try:
                obj = json.loads(bytes(raw))
                ch = (obj.get("choices") or [{}])[0]
                timer.text_parts.append(ch.get("text") or (ch.get("message") or {}).get("content") or "")
                timer.reply_parts.append(timer.text_parts[-1])
                timer.finish_reason = ch.get("finish_reason")
                timer.usage = obj.get("usage")
                timer.model = obj.get("model")
                timer.token_times.append(now)
                timer.chunk_tokens.append((timer.usage or {}).get("completion_tokens") or 1)
                timer.done = True
            except (ValueError, AttributeError, IndexError, TypeError):
                kind, err = _error("bad_response", "undecodable JSON body")
    except asyncio.TimeoutError:
        kind, err = _error("timeout", f"no complete answer within {opts.timeout:g} s")
    except HTTPError as exc:
        kind, err = _error(exc.kind, str(exc))
    except OSError as exc:
        kind, err = _error("disconnect", f"{type(exc).__name__}: {exc}")
    if kind is not None:
        t_end = perf()
    if kind is None and timer.error:
        kind = timer.error.split(":")[0]
        err = timer.error
    if kind is None and not (timer.done or timer.finish_reason):
        kind, err = _error("disconnect", "stream ended before [DONE] or a finish_reason")
    if kind is None and not timer.token_times:
        kind, err = _error("no_tokens", "the answer carried no generated tokens")
    usage = timer.usage or {}
    out_tokens = usage.get("completion_tokens")
    return {
        "t_send": t_send,
        "t_end": t_end,
        "connect_ms": connect_s * 1e3,
        "http_status": state["status"] or None,
        "success": kind is None,
        "error_kind": kind,
        "error": err,
        "prompt_tokens": usage.get("prompt_tokens"),
        "output_tokens": out_tokens if out_tokens is not None else sum(timer.chunk_tokens),
        "output_tokens_source": "usage" if out_tokens is not None else "chunks",
        "finish_reason": timer.finish_reason,
        "token_times": timer.token_times,
        "chunk_tokens": timer.chunk_tokens,
        "continuous_usage": timer.continuous,
        "text": "".join(timer.text_parts),
        "reply": "".join(timer.reply_parts),
        "served_model": timer.model,
    }
