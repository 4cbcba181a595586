"""The SLO grammar, one for every command: `aegis bench`/`probe --slo`, `aegis report --slo` and a sweep's `slo:`.

An SLO is a set of limits: on the command line KEY=VALUE separated by commas, in a sweep
spec (YAML) or sweep.json a mapping KEY: VALUE. A KEY is

    max_METRIC          METRIC may be at most VALUE        max_p95_ttft_ms=2000
    min_METRIC          METRIC must be at least VALUE      min_success_pct=99
    ttft, tpot, e2el    short for max_ttft_ms, max_tpot_ms, max_e2el_ms
    X_STAT              short for max_STAT_X_ms, X one of ttft, tpot, itl, e2el and STAT one of
                        mean, median, pNN                  ttft_p99=500 (= max_p99_ttft_ms=500)

and a VALUE a finite number (a trailing "ms" is allowed: the metrics ending in _ms are
milliseconds). Limits on ttft_ms, tpot_ms and e2el_ms apply to each request: `aegis bench`/`probe`
count the requests that meet all of them (goodput; upper bounds only). Every other METRIC is one
number per run (summary.json's keys and the report's derived metrics): `aegis report` and sweeps
judge and rank runs by them, and `aegis probe --search` finds the highest rate whose runs keep
percentiles of request latencies under their limits (search()).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

from aegis.bench.metrics import LATENCIES, PERCENTILES
from aegis.errors import UsageError

SLO_RE = re.compile(r"^(max|min)_([a-z0-9_]+)$")
SHORTHAND = {"ttft": "max_ttft_ms", "tpot": "max_tpot_ms", "e2el": "max_e2el_ms"}
STAT_SHORTHAND_RE = re.compile(r"^(" + "|".join(LATENCIES) + r")_(mean|median|p[0-9]+)$")  # ttft_p99
PER_REQUEST = {"ttft_ms": "ttft", "tpot_ms": "tpot", "e2el_ms": "e2el"}  # metric -> bench's goodput key
GRAMMAR = "max_METRIC=VALUE or min_METRIC=VALUE, e.g. max_p95_ttft_ms=2000,min_success_pct=99"
GOODPUT_GRAMMAR = "ttft=MS,tpot=MS,e2el=MS (or max_ttft_ms=MS, ...), e.g. ttft=500,tpot=50"
SEARCH_STATS = ("median",) + tuple(f"p{p}" for p in PERCENTILES)  # the percentiles a search can limit
SEARCH_GRAMMAR = (f"METRIC_STAT=MS with METRIC one of {', '.join(LATENCIES)} and STAT one of "
                  f"{', '.join(SEARCH_STATS)}, e.g. ttft_p99=500,itl_p99=50")
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
    if m := STAT_SHORTHAND_RE.match(key):
        key = f"max_{m.group(2)}_{m.group(1)}_ms"
    return key if SLO_RE.match(key) else None


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        text = text[:-2] if text.endswith("ms") else text
        try:
            number = float(text)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
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
                                "limits on a run's metrics go to aegis report --slo, a sweep's slo or "
                                "aegis probe --search --slo (ttft_p99=MS)")
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


def search(slo: Mapping[str, float]) -> dict[str, float]:
    """The limits of `aegis probe --search`: upper bounds on percentiles of request latencies; SLOError else."""
    if not slo:
        raise SLOError("''", f"give at least one limit: {SEARCH_GRAMMAR}")
    for key, value in slo.items():
        bound, metric = split(key)
        if metric in PER_REQUEST:
            raise SLOError(key, f"limits each request (goodput); the search limits a percentile of a run's "
                                f"requests, e.g. {PER_REQUEST[metric]}_p99={value:g}")
        stat, _, rest = metric.partition("_")
        name = rest[:-3] if rest.endswith("_ms") else None
        if name not in LATENCIES or stat not in SEARCH_STATS + ("mean",):
            raise SLOError(key, f"unknown metric {metric!r}; the search takes {SEARCH_GRAMMAR}")
        if stat == "mean":
            raise SLOError(key, f"the search decides by a percentile's confidence interval; limit a percentile "
                                f"({', '.join(SEARCH_STATS)}), e.g. {name}_p99")
        if bound != "max":
            raise SLOError(key, f"the search takes upper bounds on latencies: max_{metric} (or {name}_{stat})")
        if value <= 0:
            raise SLOError(key, "must be a positive number of milliseconds")
    return dict(slo)


def parse_search(text: str | None, option: str = "--slo") -> dict[str, float]:
    """`aegis probe --search --slo`: 'ttft_p99=500,itl_p99=50' -> {'max_p99_ttft_ms': 500.0, ...}."""
    try:
        return search(parse_limits(text, SEARCH_GRAMMAR))
    except SLOError as exc:
        raise UsageError(f"{option} {exc}") from None


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
