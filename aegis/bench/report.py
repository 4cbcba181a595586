"""Human-readable tables: the bench summary and the probe table."""
from __future__ import annotations

from aegis.util.tables import format_row, format_table

RESULT_WIDTHS = (42, 18)  # the label and value columns of vLLM's `bench serve` result block


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _line(label: str, value) -> str:
    return format_row((label, value), RESULT_WIDTHS, right=(1,), sep="")


def format_summary(s: dict, out_dir: str | None = None) -> str:
    """vLLM-style result block, plus error kinds, dispatch lag and Prometheus facts."""
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration']:.2f}"),
            ("Total input tokens", s["total_input_tokens"]), ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}")]
    if s.get("request_goodput") is not None:
        rows.append(("Request goodput (req/s)", f"{s['request_goodput']:.2f}"))
    rows += [("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
             ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]
    lines += [_line(k + ":", v) for k, v in rows]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for key, title in titles.items():
        lines.append(f"{title:-^60}")
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {key.upper()} (ms):"
            lines.append(_line(label, f"{s[f'{stat}_{key}_ms']:.2f}"))
    if s.get("sessions"):
        ses = s["sessions"]
        lines.append("{:-^60}".format("Sessions"))
        lines.append(_line("Sessions completed / planned:", f"{ses['completed']} / {ses['num_sessions']}"))
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize() if stat != 'p99' else 'P99'} session time (ms):"
            lines.append(_line(label, f"{ses[f'{stat}_session_ms']:.2f}"))
        turns = sorted((s.get("per_turn") or {}).items(), key=lambda kv: int(kv[0]))
        turn_rows = [(k, m["completed"], f"{m['median_ttft_ms']:.2f}", f"{m['p99_ttft_ms']:.2f}",
                 f"{m['total_input_tokens'] / m['completed']:.0f}" if m["completed"] else "-") for k, m in turns]
        lines.append(format_table(("Turn", "OK", "TTFT med (ms)", "TTFT p99 (ms)", "Prompt tok"), turn_rows,
                                  right=(0, 1, 2, 3, 4)))
    lines.append("{:-^60}".format("Client"))
    lag = s["dispatch_lag_ms"]
    lines.append(_line("Dispatch lag median / p99 (ms):", f"{lag['median']:>8.2f} / {lag['p99']:>7.2f}"))
    if s.get("offered_rate") is not None:
        asked = f" (asked {s['request_rate']:g})" if s.get("request_rate") else ""
        lines.append(_line("Offered rate (req/s):", f"{s['offered_rate']:.2f}{asked}"))
    lines.append(_line("Worker processes:", s.get("num_workers", 0)))
    if s.get("errors_by_kind"):
        lines.append("Errors: " + ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_kind"].items())))
    prom = (s.get("prometheus") or {}).get("total") or {}
    if prom.get("scrapes_ok"):
        lines.append("{:-^60}".format("Server (Prometheus)"))
        for key, label in (("running_max", "Max running requests"), ("waiting_max", "Max waiting requests"),
                           ("kv_cache_usage_perc_max", "Max KV cache usage"),
                           ("num_preemptions_delta", "Preemptions"),
                           ("prefix_cache_hit_rate", "Prefix cache hit rate")):
            if prom.get(key) is not None:
                v = prom[key]
                text = f"{100 * v:.1f}%" if key in ("kv_cache_usage_perc_max", "prefix_cache_hit_rate") else f"{v:g}"
                lines.append(_line(label + ":", text))
    if len(s.get("per_endpoint") or {}) > 1:
        lines.append("{:-^60}".format("Per endpoint"))
        lines.append(_breakdown("Endpoint", s["per_endpoint"]))
    if s.get("per_adapter"):
        lines.append("{:-^60}".format("Per adapter"))
        lines.append(_breakdown("Adapter", s["per_adapter"]))
    lines.append("=" * 60)
    if s.get("status") == "interrupted":
        lines.append("INTERRUPTED: the summary covers the requests that finished; continue with --resume")
    if s.get("client_bound"):
        lines.append("CLIENT-BOUND: " + "; ".join(s["client_bound_reasons"])
                     + " -- the client, not the server, limited this run (add --workers or machines)")
    if s.get("client_starved"):
        lines.append("CLIENT-STARVED: " + "; ".join(s["client_starved_reasons"])
                     + " -- other work on this machine held the load generator's CPU, not its own work: run the "
                       "client on cores of its own (taskset -c) or on another machine; more --workers will not help")
    if out_dir:
        lines.append(f"Results: {out_dir}")
    return "\n".join(lines)


def _breakdown(what: str, groups: dict) -> str:
    rows = [(name, m["completed"], m["failed"], f"{m['median_ttft_ms']:.2f}") for name, m in groups.items()]
    return format_table((what, "OK", "Failed", "TTFT med (ms)"), rows, right=(1, 2, 3))


# The probe table is printed a row at a time as each rate finishes: its column widths are fixed.
PROBE_COLUMNS = (("Rate", 8), ("Success%", 8), ("Tokens", 8), ("TTFT Med", 10), ("TTFT P99", 10), ("Lat Med", 10),
                 ("Status", 8))
_PROBE_WIDTHS = tuple(w for _, w in PROBE_COLUMNS)
_PROBE_RIGHT = range(len(PROBE_COLUMNS))


def _probe_line(cells) -> str:
    return format_row(cells, _PROBE_WIDTHS, right=_PROBE_RIGHT, sep=" | ")


PROBE_HEADER = _probe_line([h for h, _ in PROBE_COLUMNS])


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:.2f}s" if ms >= 10000 else f"{ms:.1f}ms"


def probe_row(r: dict) -> str:
    mark = ("*" if r.get("client_bound") else "") + ("!" if r.get("client_starved") else "")
    return _probe_line((f"{r['rate']:g}", f"{r['success_pct']:.1f}%", r["output_tokens"], _fmt_ms(r["ttft_median_ms"]),
                        _fmt_ms(r["ttft_p99_ms"]), _fmt_ms(r["latency_median_ms"]), r["status"] + mark))
