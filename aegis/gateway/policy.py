"""Which instance takes a request: prefix-affine (cache-aware), least-loaded or round-robin, plus the retry order.

cache_aware sends requests whose prompts start alike to the same instance, so that
instance's prefix cache holds their shared prefix: the first PREFIX_CHARS characters
of the prompt pick an instance by rendezvous hashing (stable while instances come and
go: only the keys of a removed instance move). Affinity yields to load when the chosen
instance has BALANCE_ABS more requests in flight than the least loaded one and
BALANCE_REL times as many (the same two-threshold rule as vllm-router's cache_aware).
least_loaded is the power of two choices; round_robin rotates.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import time
from collections.abc import Sequence

from aegis.gateway.backends import Backend

POLICIES = ("cache_aware", "least_loaded", "round_robin")
PREFIX_CHARS = 256
BALANCE_ABS = 8
BALANCE_REL = 1.5


def prefix_key(doc: dict) -> str:
    """The text a request's prompt starts with (completions: prompt; chat: the messages in order)."""
    prompt = doc.get("prompt")
    if isinstance(prompt, str):
        return prompt[:PREFIX_CHARS]
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        return (first if isinstance(first, str) else str(prompt[:PREFIX_CHARS]))[:PREFIX_CHARS]
    parts: list[str] = []
    size = 0
    for msg in doc.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        text = content if isinstance(content, str) else str(content)
        parts.append(text)
        size += len(text)
        if size >= PREFIX_CHARS:
            break
    return "\x1e".join(parts)[:PREFIX_CHARS]


def _score(key: str, ident: str) -> bytes:
    return hashlib.blake2b(f"{ident}\x00{key}".encode(), digest_size=8).digest()


class Chooser:
    """Orders the candidate instances of one request: the first is tried first, the rest are its retries."""

    def __init__(self, policy: str = "cache_aware"):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self.turn = itertools.count()

    def order(self, candidates: Sequence[Backend], doc: dict, limit: int | None = None) -> list[Backend]:
        """The instances to try, in order (at most `limit`: only as many as a request may be sent to)."""
        now = time.monotonic()
        usable = [b for b in candidates if b.failed_until <= now] or list(candidates)
        if len(usable) == 1:
            rest = [b for b in candidates if b is not usable[0]]
            return (usable + rest)[:limit]
        keep = len(usable) if limit is None else limit
        by_load = heapq.nsmallest(keep + 1, usable, key=lambda b: b.inflight)  # +1: `first` may be among them
        if self.policy == "round_robin":
            i = next(self.turn) % len(usable)
            first = usable[i]
        elif self.policy == "least_loaded":
            a, b = random.sample(usable, 2)
            first = a if a.inflight <= b.inflight else b
        else:
            key = prefix_key(doc)
            first = max(usable, key=lambda b: _score(key, b.ident))
            least = by_load[0].inflight
            if first.inflight - least > BALANCE_ABS and first.inflight > least * BALANCE_REL:
                first = by_load[0]
        ids = {id(b) for b in usable}
        out = [first] + [b for b in by_load if b is not first] + [b for b in candidates if id(b) not in ids]
        return out if limit is None else out[:limit]
