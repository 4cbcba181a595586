"""Scrapes /metrics of every endpoint during a run: vLLM series to CSV and a summary."""
from __future__ import annotations

import asyncio
import csv
import time
from dataclasses import dataclass, field
from typing import TextIO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from aegis.engines.vllm import metric_name, metric_names

# field (a CSV column) -> sample names in order of preference (newest vLLM first, then older names);
# the names are vLLM's fact: aegis.engines.vllm.METRICS
SERIES = {
    "running": metric_names("num_requests_running"),
    "waiting": metric_names("num_requests_waiting"),
    "kv_cache_usage_perc": metric_names("kv_cache_usage"),
    "num_preemptions_total": metric_names("num_preemptions"),
    "prefix_cache_queries_total": metric_names("prefix_cache_queries"),
    "prefix_cache_hits_total": metric_names("prefix_cache_hits"),
    "prompt_tokens_total": metric_names("prompt_tokens"),
    "generation_tokens_total": metric_names("generation_tokens"),
}
LORA_INFO = metric_name("lora_requests_info")
COUNTERS = ("num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
            "prompt_tokens_total", "generation_tokens_total")
GAUGES = ("running", "waiting", "kv_cache_usage_perc", "lora_running", "lora_waiting")
CSV_COLUMNS = ("time_s", "unix_time", "endpoint", "ok") + tuple(SERIES) + (
    "lora_running", "lora_waiting", "lora_running_adapters", "lora_waiting_adapters")
_WANTED = {n for names in SERIES.values() for n in names} | {LORA_INFO}


def _adapters(label: str | None) -> list[str]:
    return [a for a in (label or "").split(",") if a]


def parse_metrics(text: str) -> dict:
    """One endpoint's /metrics text -> summed values (engines added together)."""
    # keep only the sample lines we use (real vLLM output has thousands of histogram
    # lines); without their "# TYPE" lines they parse as untyped samples
    keep = [line for line in text.splitlines()
            if line and not line.startswith("#") and line.split("{", 1)[0].split(" ", 1)[0] in _WANTED]
    samples: dict[str, float] = {}
    counts: dict[str, int] = {}
    lora: dict[tuple, tuple[float, dict]] = {}
    for fam in text_string_to_metric_families("\n".join(keep) + "\n"):
        for s in fam.samples:
            if s.name == LORA_INFO:
                eng = tuple(sorted((k, v) for k, v in s.labels.items()
                                   if k not in ("running_lora_adapters", "waiting_lora_adapters", "max_lora")))
                if eng not in lora or s.value >= lora[eng][0]:
                    lora[eng] = (s.value, s.labels)
            elif s.name in _WANTED:
                samples[s.name] = samples.get(s.name, 0.0) + s.value
                counts[s.name] = counts.get(s.name, 0) + 1
    out: dict = {}
    for key, names in SERIES.items():
        for n in names:
            if n in samples:
                # kv usage is a fraction per engine: the mean over engines, not the sum
                out[key] = samples[n] / counts[n] if key == "kv_cache_usage_perc" else samples[n]
                break
    if lora:
        running = [a for _, labels in lora.values() for a in _adapters(labels.get("running_lora_adapters"))]
        waiting = [a for _, labels in lora.values() for a in _adapters(labels.get("waiting_lora_adapters"))]
        out["lora_running"] = len(running)
        out["lora_waiting"] = len(waiting)
        out["lora_running_adapters"] = " ".join(sorted(set(running)))
        out["lora_waiting_adapters"] = " ".join(sorted(set(waiting)))
    return out


def combine(values: list[dict]) -> dict:
    """Sum across replicas (kv usage: mean; adapter names: union)."""
    out: dict = {}
    for v in values:
        for k, x in v.items():
            if isinstance(x, str):
                out[k] = " ".join(sorted(set(out.get(k, "").split()) | set(x.split())))
            else:
                out[k] = out.get(k, 0.0) + x
    kv = [v["kv_cache_usage_perc"] for v in values if "kv_cache_usage_perc" in v]
    if kv:
        out["kv_cache_usage_perc"] = sum(kv) / len(kv)
    return out


@dataclass
class _Track:
    first: dict | None = None
    last: dict | None = None
    gauges: dict = field(default_factory=lambda: {g: [] for g in GAUGES})
    ok: int = 0
    failed: int = 0

    def add(self, values: dict | None, gauges: bool = True) -> None:
        if values is None:
            self.failed += 1
            return
        self.ok += 1
        if self.first is None:
            self.first = values
        self.last = values
        for g in GAUGES if gauges else ():
            if g in values:
                self.gauges[g].append(values[g])

    def summary(self) -> dict:
        out: dict = {"scrapes_ok": self.ok, "scrapes_failed": self.failed}
        for g, xs in self.gauges.items():
            if xs:
                out[f"{g}_mean"] = sum(xs) / len(xs)
                out[f"{g}_max"] = max(xs)
        if self.first and self.last:
            for c in COUNTERS:
                if c in self.first and c in self.last:
                    out[c.replace("_total", "_delta")] = self.last[c] - self.first[c]
            q = out.get("prefix_cache_queries_delta")
            h = out.get("prefix_cache_hits_delta")
            if q is not None and h is not None:
                out["prefix_cache_hit_rate"] = h / q if q > 0 else None
        return out


SETTLE_S = 3.0  # seconds the scraper may wait after a run for the servers' counters to settle
SETTLE_STEP_S = 0.25


class Scraper:
    """Fetches every endpoint's /metrics each `interval` seconds until stopped."""

    def __init__(self, targets: dict[str, str], headers: dict[str, str], csv_path: str | None,
                 interval: float = 1.0, t0: float | None = None):
        # several instances may share a server: scrape each URL once
        self.targets = dict(sorted({url: name for name, url in targets.items()}.items()))
        self.headers, self.csv_path, self.interval = headers, csv_path, interval
        self.t0 = t0  # None: rows wait (held) until start() names the run's start
        self._held: list[tuple[float, float, str, dict | None]] = []
        self.tracks = {name: _Track() for name in self.targets.values()}
        self.total = _Track()
        self._fh: TextIO | None = None
        self._writer: csv.DictWriter[str] | None = None

    async def _one(self, session: aiohttp.ClientSession, url: str) -> dict | None:
        try:
            async with session.get(url, headers=self.headers) as r:
                if r.status != 200:
                    return None
                return parse_metrics(await r.text())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, UnicodeDecodeError):
            return None

    def start(self, t0: float) -> None:
        """The run starts at `t0` (perf_counter): rows scraped before it (the baseline) are written now."""
        self.t0 = t0
        held, self._held = self._held, []
        for at, unix, name, values in held:
            self._row(at, name, values, unix)

    def _row(self, at: float, name: str, values: dict | None, unix: float | None = None) -> None:
        if self._writer is None:
            return
        unix = time.time() if unix is None else unix
        if self.t0 is None:
            self._held.append((at, unix, name, values))
            return
        row = {"time_s": f"{at - self.t0:.3f}", "unix_time": f"{unix:.3f}", "endpoint": name,
               "ok": int(values is not None)}
        for k, v in (values or {}).items():
            row[k] = f"{v:.6g}" if isinstance(v, float) else v
        self._writer.writerow(row)

    async def scrape_once(self, session: aiohttp.ClientSession, settling: bool = False) -> None:
        """One round over every endpoint; `settling` rounds (after the run) move the counters, not the gauges."""
        urls = list(self.targets)
        results = await asyncio.gather(*(self._one(session, u) for u in urls))
        now = time.perf_counter()
        good = []
        for url, values in zip(urls, results):
            name = self.targets[url]
            self.tracks[name].add(values, gauges=not settling)
            self._row(now, name, values)
            if values is not None:
                good.append(values)
        if good and len(good) == len(urls):
            combined = combine(good)
            self.total.add(combined, gauges=not settling)
            self._row(now, "ALL", combined)
        elif not good:
            self.total.add(None)
        if self._fh:
            self._fh.flush()

    async def run(self, stop: asyncio.Event, first: asyncio.Event | None = None) -> None:
        """Scrape until `stop`, then until the counters settle; `first` is set once the first round is in
        (the baseline: a runner starts its load only then, so no request's tokens precede it)."""
        if self.csv_path:
            new = True
            try:
                new = not open(self.csv_path).read(1)
            except OSError:
                pass
            self._fh = open(self.csv_path, "a", newline="")
            self._writer = csv.DictWriter(self._fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            if new:
                self._writer.writeheader()
        timeout = aiohttp.ClientTimeout(total=max(self.interval * 2, 2.0))
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                nxt = time.perf_counter()
                while True:
                    await self.scrape_once(session)
                    if first is not None:
                        first.set()
                    if stop.is_set():
                        break
                    nxt += self.interval
                    try:
                        await asyncio.wait_for(stop.wait(), max(nxt - time.perf_counter(), 0.0))
                    except asyncio.TimeoutError:
                        pass
                # The servers count the last requests' tokens a moment after answering them: scrape
                # again until the counters stop moving (at most SETTLE_S), so deltas cover the whole run.
                deadline = time.perf_counter() + SETTLE_S
                before = self._counters()
                while before is not None and time.perf_counter() < deadline:
                    await asyncio.sleep(SETTLE_STEP_S)
                    await self.scrape_once(session, settling=True)
                    now = self._counters()
                    if now == before:
                        break
                    before = now
        finally:
            if first is not None:
                first.set()  # never leave a runner waiting on a scraper that failed
            if self._fh:
                if self.t0 is None:
                    self.start(time.perf_counter())
                self._fh.close()

    def _counters(self) -> dict | None:
        """The counters of the latest complete scrape of all endpoints (None before one)."""
        last = self.total.last
        return None if last is None else {c: last.get(c) for c in COUNTERS}

    def summary(self) -> dict:
        return {"interval_s": self.interval, "total": self.total.summary(),
                "per_endpoint": {n: t.summary() for n, t in self.tracks.items()}}
