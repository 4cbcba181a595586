"""Human-readable tables: the bench summary and the probe table."""
from __future__ import annotations


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


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
    lines += [f"{k + ':':<42}{v:>18}" for k, v in rows]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for key, title in titles.items():
        lines.append(f"{title:-^60}")
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {key.upper()} (ms):"
            lines.append(f"{label:<42}{s[f'{stat}_{key}_ms']:>18.2f}")
    lines.append("{:-^60}".format("Client"))
    lag = s["dispatch_lag_ms"]
    lines.append(f"{'Dispatch lag median / p99 (ms):':<42}{lag['median']:>8.2f} / {lag['p99']:>7.2f}")
    lines.append(f"{'Worker processes:':<42}{s.get('num_workers', 0):>18}")
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
                lines.append(f"{label + ':':<42}{text:>18}")
    if len(s.get("per_endpoint") or {}) > 1:
        lines.append("{:-^60}".format("Per endpoint"))
        for name, m in s["per_endpoint"].items():
            lines.append(f"{name:<24}{m['completed']:>6} ok {m['failed']:>4} failed  "
                         f"TTFT med {m['median_ttft_ms']:8.2f} ms")
    if s.get("per_adapter"):
        lines.append("{:-^60}".format("Per adapter"))
        for name, m in s["per_adapter"].items():
            lines.append(f"{name:<24}{m['completed']:>6} ok {m['failed']:>4} failed  "
                         f"TTFT med {m['median_ttft_ms']:8.2f} ms")
    lines.append("=" * 60)
    if s.get("status") == "interrupted":
        lines.append("INTERRUPTED: the summary covers the requests that finished; continue with --resume")
    if s.get("client_bound"):
        lines.append("CLIENT-BOUND: " + "; ".join(s["client_bound_reasons"])
                     + " -- the client, not the server, limited this run (add --workers or machines)")
    if out_dir:
        lines.append(f"Results: {out_dir}")
    return "\n".join(lines)


PROBE_HEADER = (f"{'Rate':>8} | {'Success%':>8} | {'Tokens':>8} | {'TTFT Med':>10} | {'TTFT P99':>10} | "
                f"{'Lat Med':>10} | {'Status':>8}")


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:.2f}s" if ms >= 10000 else f"{ms:.1f}ms"


def probe_row(r: dict) -> str:
    mark = "*" if r.get("client_bound") else ""
    return (f"{r['rate']:>8g} | {r['success_pct']:>7.1f}% | {r['output_tokens']:>8} | "
            f"{_fmt_ms(r['ttft_median_ms']):>10} | {_fmt_ms(r['ttft_p99_ms']):>10} | "
            f"{_fmt_ms(r['latency_median_ms']):>10} | {r['status'] + mark:>8}")
