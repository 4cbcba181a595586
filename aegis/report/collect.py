"""Find bench, probe and vLLM results under the given paths and turn each run into metric rows."""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from aegis.bench.probe_search import SEARCH_FILE
from aegis.errors import UsageError
from aegis.rundir import RunDir
from aegis.sweep.status import PointState

OOM_RE = re.compile(r"out of memory|OutOfMemoryError|CUDA error: out of memory|UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY",
                    re.IGNORECASE)
LOG_TAIL_BYTES = 1 << 20
POINT_SKIP = ("warmup", "attempts")  # inside a sweep point: not measurements


def startup_metric(phase: str) -> str:
    """The report's metric for a startup phase (aegis.launch.endpoints.PHASES): slowest instance, seconds."""
    return f"startup_{phase}_s"


@dataclass
class Run:
    """One measured load run (a bench directory, or one rate of a probe) of one configuration."""

    config: str  # configuration name (sweep label, else the directory name)
    kind: str  # "bench", "probe", "vllm" (vllm bench serve) or "missing"
    path: str
    metrics: dict = field(default_factory=dict)
    rate: float | None = None
    devices: int | None = None
    config_hash: str | None = None
    notes: list = field(default_factory=list)  # failures other than the SLO (errors, OOM, not run)
    prom_csv: str | None = None

    @property
    def name(self) -> str:
        return self.config if self.rate is None else f"{self.config}@{self.rate:g}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _point_info(path: Path, stop: Path) -> tuple[Path, dict] | None:
    """The nearest sweep point (a directory with point.json) at or above `path`, up to `stop`."""
    for d in [path, *path.parents]:
        info = _read_json(RunDir(d).point)
        if info is not None:
            return d, info
        if d == stop:
            break
    return None


def _lora_changes(prom_csv: Path) -> int | None:
    """Changes of the set of running adapters between scrapes (a proxy for adapter swaps)."""
    try:
        with open(prom_csv, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("endpoint") != "ALL" and r.get("ok") == "1"]
    except OSError:
        return None
    if not rows or all(not r.get("lora_running_adapters") for r in rows):
        return None
    last: dict[str, frozenset[str]] = {}
    changes = 0
    for r in rows:
        now = frozenset(filter(None, (r.get("lora_running_adapters") or "").split(",")))
        ep = r["endpoint"]
        if ep in last and now - last[ep]:
            changes += 1
        last[ep] = now
    return changes


def summary_metrics(s: dict, devices: int | None) -> dict:
    """The numbers of one summary.json (vLLM's keys) plus derived ones."""
    m = {k: float(v) for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    total = s.get("completed", 0) + s.get("failed", 0)
    m["success_pct"] = 100.0 * s.get("completed", 0) / total if total else 0.0
    m["dispatch_lag_p99_ms"] = float((s.get("dispatch_lag_ms") or {}).get("p99") or 0.0)
    m["client_bound"] = 1.0 if s.get("client_bound") else 0.0
    m["client_starved"] = 1.0 if s.get("client_starved") else 0.0
    m["endpoints"] = float(len(s.get("endpoints") or []))
    if devices:
        m["devices"] = float(devices)
        m["output_throughput_per_device"] = s.get("output_throughput", 0.0) / devices
    tpot = s.get("median_tpot_ms")
    if tpot:
        m["output_tokens_per_s_per_user"] = 1000.0 / tpot
    prom = (s.get("prometheus") or {}).get("total") or {}
    for key in ("running_max", "waiting_max", "kv_cache_usage_perc_max", "num_preemptions_delta",
                "prefix_cache_hit_rate", "running_mean", "waiting_mean"):
        if isinstance(prom.get(key), (int, float)):
            m["prom_" + key] = float(prom[key])
    return {k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}


def _notes(s: dict) -> list[str]:
    notes = []
    if s.get("failed"):
        kinds = ", ".join(f"{k} {v}" for k, v in sorted((s.get("errors_by_kind") or {}).items()))
        notes.append(f"{s['failed']} failed requests" + (f" ({kinds})" if kinds else ""))
    if s.get("status") == "interrupted":
        notes.append("interrupted run")
    if s.get("client_bound"):
        notes.append("client-bound: " + "; ".join(s.get("client_bound_reasons") or []))
    if s.get("client_starved"):
        notes.append("client starved by other work: " + "; ".join(s.get("client_starved_reasons") or []))
    return notes


def oom_log(point_dir: Path) -> Path | None:
    """The first log of a sweep point (*.log, *.out, logs/*) that reports running out of memory."""
    logs = [*sorted(point_dir.glob("*.log")), *sorted(point_dir.glob("*.out")),
            *sorted(RunDir(point_dir).logs.glob("*"))]
    for log in logs:
        try:
            with open(log, "rb") as fh:
                fh.seek(max(0, log.stat().st_size - LOG_TAIL_BYTES))
                if OOM_RE.search(fh.read().decode("utf-8", "replace")):
                    return log
        except OSError:
            continue
    return None


def _bench_run(d: Path, root: Path, kind: str, config_name: str, default_devices: int | None,
               rate: float | None = None) -> Run | None:
    s = _read_json(d / "summary.json")
    if s is None:
        return None
    point = _point_info(d, root)
    devices, digest = default_devices, None
    if point:
        config_name, devices, digest = point[1].get("label", config_name), point[1].get("devices"), \
            point[1].get("hash")
    elif devices is None:
        devices = len(s.get("endpoints") or []) or None  # one device per endpoint unless told
    run = Run(config=config_name, kind=kind, path=str(d), rate=rate, devices=devices, config_hash=digest,
              metrics=summary_metrics(s, devices), notes=_notes(s))
    if point:  # the point's own servers: when their slowest instance reached each startup phase
        doc = RunDir(point[0]).read_endpoints()
        for phase, seconds in (doc.slowest_phases() if doc else {}).items():
            run.metrics[startup_metric(phase)] = seconds
    status = _read_json(RunDir(point[0]).point_status) if point else None
    if status and status.get("state") in (PointState.FAILED, PointState.INTERRUPTED):
        run.notes.append(f"point {status['state']}: {status.get('reason') or 'no reason recorded'}")
    if rate is not None:
        run.metrics["rate"] = rate
    if (d / "prometheus.csv").exists():
        run.prom_csv = str(d / "prometheus.csv")
        swaps = _lora_changes(d / "prometheus.csv")
        if swaps is not None:
            run.metrics["lora_adapter_set_changes"] = float(swaps)
    return run


def _name_for(d: Path, root: Path) -> str:
    point = _point_info(d, root)
    if point:
        return point[1].get("label", point[0].name)
    return d.name if d != root or not d.name.startswith("bench") else d.parent.name + "/" + d.name


def collect(paths, devices: int | None = None) -> list[Run]:
    """Every bench run, probe rate, vLLM result and unfinished sweep point found under `paths` (searched
    recursively; a path may also be a vLLM result file)."""
    from aegis.report import vllm

    runs: list[Run] = []
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise UsageError(f"{given}: no such file or directory")
        if root.is_file() and vllm.is_result(root):
            if not (more := vllm.runs(root, devices)):
                raise UsageError(f"{given}: holds no `vllm bench serve --save-result` result (a JSON object with "
                                 f"{', '.join(vllm.REQUIRED)}); give vLLM's result file as it wrote it")
            runs += more
            continue
        if not root.is_dir():
            raise UsageError(f"{given}: neither a directory nor a `vllm bench serve --save-result` file; give "
                             "bench, probe or sweep result directories, or vLLM's result files")
        found = False
        for dirpath, dirnames, filenames in os.walk(root):
            d = Path(dirpath)
            dirnames.sort()
            for f in sorted(filenames):
                if vllm.is_result(d / f):
                    runs += (more := vllm.runs(d / f, devices))
                    found = found or bool(more)
            if "probe.json" in filenames:
                probe = _read_json(d / "probe.json") or {}
                name = _name_for(d, root)
                for entry in probe.get("rates", []):
                    sub = d / f"rate-{entry['rate']:g}"
                    if not sub.is_dir() and entry.get("output_dir"):
                        sub = Path(entry["output_dir"])
                    run = _bench_run(sub, root, "probe", name, devices, rate=float(entry["rate"]))
                    if run:
                        runs.append(run)
                        found = True
                dirnames[:] = []  # its rate-* directories are read above
            elif SEARCH_FILE in filenames:  # aegis probe --search: every run of every rate it tried
                search = _read_json(d / SEARCH_FILE) or {}
                name = _name_for(d, root)
                for point in search.get("points", []):
                    for entry in point.get("runs", []):
                        run = _bench_run(d / entry["dir"], root, "probe", name, devices, rate=float(point["rate"]))
                        if run:
                            runs.append(run)
                            found = True
                dirnames[:] = []
            elif "summary.json" in filenames:
                run = _bench_run(d, root, "bench", _name_for(d, root), devices)
                if run:
                    runs.append(run)
                    found = True
                dirnames[:] = []
            elif (point := RunDir(d)).point.name in filenames:
                # A point's warm-up and earlier attempts are not results.
                dirnames[:] = [n for n in dirnames if n not in POINT_SKIP]
                if any(_has_results(d / n) for n in dirnames):
                    continue
                info = _read_json(point.point) or {}
                status = _read_json(point.point_status) or {}
                why = status.get("reason") or ("out of memory (found in the logs)" if oom_log(d)
                                                else "no results (not run yet, or the servers never became healthy)")
                runs.append(Run(config=info.get("label", d.name), kind="missing", path=str(d),
                                devices=info.get("devices"), config_hash=info.get("hash"), notes=[why]))
                found = True
                dirnames[:] = []
        if not found:
            raise UsageError(f"{given}: no results found (no summary.json, probe.json, {SEARCH_FILE}, point.json or "
                             "vllm bench serve result file below it)")
    return runs


def _has_results(d: Path) -> bool:
    return any(f in ("summary.json", "probe.json", SEARCH_FILE) for _, _, files in os.walk(d) for f in files)
