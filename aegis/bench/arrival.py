"""Seeded arrival schedules: Poisson, gamma (burstiness), constant and trace timestamps."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from aegis.errors import UsageError

PROCESSES = ("poisson", "gamma", "constant", "trace")


@dataclass(frozen=True)
class ArrivalSpec:
    """What the schedule looks like: process, rate (req/s), burstiness, trace file."""

    process: str = "poisson"
    rate: float | None = None          # None: closed loop (no schedule)
    burstiness: float = 1.0            # gamma shape k; 1 == Poisson
    trace: tuple[float, ...] | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.process not in PROCESSES:
            raise UsageError(f"unknown arrival process {self.process!r}; choose one of {', '.join(PROCESSES)}")
        if self.process == "trace":
            if not self.trace:
                raise UsageError("--arrival trace needs --trace FILE with at least one timestamp")
            return
        if self.rate is None:
            return
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise UsageError(f"--rate must be a positive number of requests per second, not {self.rate}")
        if self.process == "gamma" and not self.burstiness > 0:
            raise UsageError(f"--burstiness must be > 0, not {self.burstiness}")


def _gaps(spec: ArrivalSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    assert spec.rate is not None  # schedule() draws gaps only for a rate
    rate = float(spec.rate)
    if spec.process == "constant":
        return np.full(n, 1.0 / rate)
    if spec.process == "poisson" or spec.burstiness == 1.0:
        return rng.exponential(1.0 / rate, size=n)
    k = spec.burstiness
    return rng.gamma(shape=k, scale=1.0 / (rate * k), size=n)


def schedule(spec: ArrivalSpec, num_requests: int | None = None,
             duration: float | None = None) -> np.ndarray:
    """Intended send offsets (seconds from the start, non-decreasing) of each request.

    The first request goes at 0. With a rate, the n - 1 gaps are drawn from the
    process and then scaled so that their mean is exactly 1/rate: n requests at
    rate R span (n - 1)/R seconds, whatever the seed (the offered rate is the one
    asked for; the seed shapes the gaps, not their sum). With only a duration, n
    is the number of requests that fit at the rate, ceil(R * duration), so a
    duration gives the same schedule as that count. With both, the count's
    schedule is cut at the duration. The same seed gives the same schedule.
    """
    spec.validate()
    if spec.process == "trace":
        t = np.asarray(spec.trace, dtype=float)
        t = np.sort(t - t.min())
        if duration is not None:
            t = t[t < duration]
        return t[:num_requests] if num_requests is not None else t
    if spec.rate is None:
        raise UsageError("an open-loop schedule needs --rate (or use --concurrency for a closed loop)")
    if num_requests is None and duration is None:
        raise UsageError("give --num-requests or --duration")
    n = num_requests if num_requests is not None else max(1, math.ceil(float(spec.rate) * float(duration or 0)))
    gaps = _gaps(spec, np.random.default_rng(spec.seed), n - 1)
    if n > 1 and gaps.sum() > 0:
        gaps = gaps * ((n - 1) / float(spec.rate) / gaps.sum())
    t = np.concatenate([np.zeros(1), np.cumsum(gaps)])
    return t[t < duration] if duration is not None else t


def load_trace(path: str) -> tuple[float, ...]:
    """Timestamps (seconds) from a file: one number per line, or JSONL with "timestamp"."""
    out = []
    try:
        with open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    if line.startswith("{"):
                        obj = json.loads(line)
                        value = obj.get("timestamp", obj.get("time"))
                    else:
                        value = line.split(",")[0]
                    number = float(value)
                    if not math.isfinite(number) or number < 0:
                        raise ValueError(value)
                    out.append(number)
                except (TypeError, ValueError):
                    raise UsageError(f"trace file {path!r} line {lineno}: expected a timestamp in seconds "
                                     "(a finite number >= 0, or JSON with \"timestamp\")") from None
    except OSError as exc:
        raise UsageError(f"cannot read trace file {path!r}: {exc.strerror}") from None
    if not out:
        raise UsageError(f"trace file {path!r} holds no timestamps")
    return tuple(out)
