"""The SLO grammar, one for every command: `aegis bench`/`probe --slo`, `aegis report --slo` and a sweep's `slo:`.

An SLO is a set of limits: on the command line KEY=VALUE separated by commas, in a sweep
spec (YAML) or sweep.json a mapping KEY: VALUE. A KEY is

    max_METRIC          METRIC may be at most VALUE        max_p95_ttft_ms=2000
    min_METRIC          METRIC must be at least VALUE      min_success_pct=99
    ttft, tpot, e2el    short for max_ttft_ms, max_tpot_ms, max_e2el_ms

and a VALUE a number (a trailing "ms" is allowed: the metrics ending in _ms are milliseconds).
Limits on ttft_ms, tpot_ms and e2el_ms apply to each request: `aegis bench`/`probe` count the
requests that meet all of them (goodput; upper bounds only). Every other METRIC is one number
per run (summary.json's keys and the report's derived metrics): `aegis report` and sweeps judge
and rank runs by them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from aegis.errors import UsageError

SLO_RE = re.compile(r"^(max|min)_([a-z0-9_]+)$")
SHORTHAND = {"ttft": "max_ttft_ms", "tpot": "max_tpot_ms", "e2el": "max_e2el_ms"}
PER_REQUEST = {"ttft_ms": "ttft", "tpot_ms": "tpot", "e2el_ms": "e2el"}  # metric -> bench's goodput key
GRAMMAR = "max_METRIC=VALUE or min_METRIC=VALUE, e.g. max_p95_ttft_ms=2000,min_success_pct=99"
GOODPUT_GRAMMAR = "ttft=MS,tpot=MS,e2el=MS (or max_ttft_ms=MS, ...), e.g. ttft=500,tpot=50"
KEY_HELP = ("must be max_<metric> or min_<metric>, e.g. max_p95_ttft_ms, min_success_pct (metrics: the keys of "
            "summary.json and the report's derived metrics)")


class SLOError(ValueError):
    """One bad limit: `key` is the limit as written, `msg` what is wrong with it (one line)."""

    def __init__(self, key, msg: str):
        super().__init__(f"{key}: {msg}")
        self.key, self.msg = key, msg


def split(key: str) -> tuple[str, str]:
    """'max_p95_ttft_ms' -> ('max', 'p95_ttft_ms')."""
    m = SLO_RE.match(key)
    assert m is not None, key  # limits reach here canonical (parse_limits, from_mapping)
    bound, metric = m.groups()
    return bound, metric


def _key(key) -> str | None:
    """The limit's canonical key (ttft -> max_ttft_ms), or None when it is not one."""
    if not isinstance(key, str):
        return None
    key = key.strip().lower()
    key = SHORTHAND.get(key, key)
    return key if SLO_RE.match(key) else None


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        text = text[:-2] if text.endswith("ms") else text
        try:
            return float(text)
        except ValueError:
            return None
    return None


def parse_limits(text: str | None, usage: str = GRAMMAR) -> dict[str, float]:
    """'max_p95_ttft_ms=2000,ttft=500ms' -> {'max_p95_ttft_ms': 2000.0, 'max_ttft_ms': 500.0}; SLOError.

    `usage`: how the error for an entry that is no limit says to write one.
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        canonical = _key(key)
        if not sep or canonical is None:
            raise SLOError(repr(part), f"use {usage}")
        number = _number(value)
        if number is None:
            raise SLOError(repr(part), f"{value.strip()!r} is not a number")
        out[canonical] = number
    return out


def parse_slo(text: str | None, option: str = "--slo") -> dict[str, float]:
    """parse_limits for a command-line option: a UsageError names the option."""
    try:
        return parse_limits(text)
    except SLOError as exc:
        raise UsageError(f"{option} {exc}") from None


def from_mapping(data: Mapping | None) -> dict[str, float]:
    """The same grammar as a mapping (a sweep spec's `slo:`, sweep.json); SLOError names the bad key."""
    out: dict[str, float] = {}
    for key, value in (data or {}).items():
        canonical = _key(key)
        if canonical is None:
            raise SLOError(key, KEY_HELP)
        number = _number(value)
        if number is None:
            raise SLOError(key, f"must be a number (got {value!r})")
        out[canonical] = number
    return out


# -- where the limits apply ------------------------------------------------------------------------


def goodput(slo: Mapping[str, float]) -> dict[str, float]:
    """The per-request limits for bench's goodput: {'ttft': ms, ...}; SLOError for any other limit."""
    out: dict[str, float] = {}
    for key, value in slo.items():
        bound, metric = split(key)
        if metric not in PER_REQUEST or bound != "max":
            raise SLOError(key, "goodput limits each request: ttft, tpot, e2el in ms (max_ttft_ms=...); "
                                "limits on a run's metrics go to aegis report --slo or a sweep's slo")
        if value <= 0:
            raise SLOError(PER_REQUEST[metric], "must be positive (milliseconds)")
        out[PER_REQUEST[metric]] = value
    return out


def run_level(slo: Mapping[str, float]) -> dict[str, float]:
    """Limits on a run's metrics (report, sweep); SLOError for a per-request limit."""
    for key in slo:
        metric = split(key)[1]
        if metric in PER_REQUEST:
            raise SLOError(key, f"limits each request (aegis bench --slo {PER_REQUEST[metric]}=MS counts "
                                f"goodput with it); a run's SLO limits its metrics, e.g. max_p95_{metric}")
    return dict(slo)


def parse_goodput(text: str | None, option: str = "--slo") -> dict[str, float]:
    """`aegis bench`/`probe --slo`: 'ttft=500,tpot=50' -> {'ttft': 500.0, 'tpot': 50.0}."""
    try:
        return goodput(parse_limits(text, GOODPUT_GRAMMAR))
    except SLOError as exc:
        raise UsageError(f"{option} {exc}") from None


def parse_run_slo(text: str | None, option: str = "--slo") -> dict[str, float]:
    """`aegis report --slo`: 'max_p95_ttft_ms=2000,min_success_pct=99' -> the same as a dict."""
    try:
        return run_level(parse_limits(text))
    except SLOError as exc:
        raise UsageError(f"{option} {exc}") from None


# -- judging and describing runs -------------------------------------------------------------------


def violations(slo: Mapping[str, float], metrics: Mapping[str, float]) -> list[str]:
    """Why a run with `metrics` misses the SLO (empty: it meets it)."""
    reasons = []
    for key, limit in slo.items():
        bound, metric = split(key)
        value = metrics.get(metric)
        if value is None:
            reasons.append(f"SLO {metric}: not measured")
        elif bound == "max" and value > limit:
            reasons.append(f"SLO {metric} {value:.4g} > {limit:g}")
        elif bound == "min" and value < limit:
            reasons.append(f"SLO {metric} {value:.4g} < {limit:g}")
    return reasons


def describe(slo: Mapping[str, float]) -> str:
    """'p95_ttft_ms <= 2000, success_pct >= 99' ('' for no SLO)."""
    return ", ".join(f"{split(k)[1]} {'<=' if split(k)[0] == 'max' else '>='} {v:g}" for k, v in slo.items())
