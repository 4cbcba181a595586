"""The per-request record: one line of a bench's requests.jsonl (vLLM's RequestFuncOutput, plus timing context).

Workers write one record per finished request (`write_record`, a single os.write of one line, so a
killed bench loses nothing but the request in flight); metrics, reports and resume read them back
(`read_records`). Times are in milliseconds (`*_ms`) or seconds since the run's start (`*_s`).
"""
from __future__ import annotations

import json
import os
from typing import TypedDict


class RequestRecord(TypedDict, total=False):
    index: int  # the request's position in the workload (resume skips the indices already done)
    segment: int  # which invocation of the run sent it (0, then one more per --resume)
    worker: int
    request_id: str  # the X-Request-Id sent (aegis-<run>-<segment>-<index>)
    endpoint: str  # the instance's name
    url: str
    model: str  # the model or LoRA adapter asked for
    adapter: str | None
    group: int | None  # the workload's prefix group (shared-prefix workloads; None otherwise)
    api: str  # completions or chat
    intended_s: float  # when the arrival process scheduled it
    sent_s: float  # when it was sent (sent_s - intended_s: the client's own lag)
    sent_unix: float
    dispatch_lag_ms: float
    queue_wait_ms: float  # waiting for a concurrency slot (closed loop / --concurrency)
    success: bool
    error_kind: str | None
    error: str | None
    http_status: int | None
    ttft_ms: float | None
    e2el_ms: float
    tpot_ms: float | None  # (e2el - ttft) / (output_tokens - 1), vLLM's definition
    itl_ms: list[float]  # the gaps between streamed tokens
    prompt_tokens: int | None
    output_tokens: int
    output_tokens_source: str  # usage (the server's count) or chunks (counted here)
    target_prompt_tokens: int
    target_output_tokens: int
    finish_reason: str | None
    connect_ms: float | None
    chunk_tokens: list[int]  # only when a streamed chunk carried several tokens
    session: int  # sessions workload: the conversation (only there)
    turn: int  # sessions workload: the turn in it, from 0


def write_record(fd: int, rec: RequestRecord) -> None:
    """Append one record as one line (one write call: lines never interleave between workers)."""
    os.write(fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())


def read_records(path: str, repair: bool = False) -> list[RequestRecord]:
    """All complete lines of a requests.jsonl; with `repair`, cut a half-written last line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        data = fh.read()
    good_end = data.rfind(b"\n") + 1
    if repair and good_end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    out = []
    for line in data[:good_end].splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out
