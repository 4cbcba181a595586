"""`aegis plan` and `aegis size`: where every instance runs, and how many instances and devices a job needs."""
from __future__ import annotations

import json

import click

from aegis.config.flags import config_options, resolve_from_cli
from aegis.errors import UsageError
from aegis.plan.placement import format_table
from aegis.plan.size import BYTES, fit_tp, instances_needed, nodes_for, site_facts, throughput_of


@click.command("plan")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (plan.json's format).")
@click.option("--all", "every", is_flag=True,
              help="List every instance: the table shows one row per instance instead of summarising a "
                   "model's identical nodes, and the JSON lists every instance instead of blocks.")
@click.option("--commands", is_flag=True,
              help="Print what the job will run: the launcher step and each rank's environment, cores and "
                   "command line, as shell lines for an interactive allocation (with --json: as JSON).")
def plan_cmd(as_json, every, commands, **kw):
    """Show where every instance of CONFIG will run (nodes, devices, CPU cores, ports)."""
    res = resolve_from_cli(kw)
    if commands:
        from aegis.config.resolve import job_nodes
        from aegis.launch.preview import commands as preview
        from aegis.launch.preview import render

        doc = preview(res.site, res.config, res.plan, job_nodes(res.config, res.plan))
        click.echo(json.dumps(doc, indent=1) if as_json else render(doc), nl=not as_json)
        return
    if as_json:
        click.echo((res.plan.expanded() if every else res.plan).to_json(), nl=False)
    else:
        click.echo(format_table(res.plan, every=every))


@click.command("size")
@click.option("--tokens", type=float, help="Tokens to produce (W).")
@click.option("--deadline", type=float, help="Hours until the work must be done.")
@click.option("--budget", type=float, help="Node-hours of the allocation: does --tokens fit in them?")
@click.option("--throughput", help="Per-instance tokens/s: a number, a bench result (summary.json or its "
              "directory), or a report's summary.csv (its best run that meets the SLO).")
@click.option("--metric", type=click.Choice(["output_throughput", "total_token_throughput"]),
              default="output_throughput", show_default=True, help="Which tokens W counts (from a result file).")
@click.option("--site", help="Site profile (devices per node, device memory).")
@click.option("--tensor-parallel-size", "--tp", "tp", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--pipeline-parallel-size", "--pp", "pp", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--model-params", type=float, help="Model parameters, e.g. 70e9 (memory fit mode).")
@click.option("--dtype", default="bf16", show_default=True, help="Weight dtype: " + ", ".join(BYTES))
@click.option("--kv-cache-dtype", default=None, help="KV-cache dtype [default: --dtype].")
@click.option("--max-model-len", type=click.IntRange(min=1), help="Context length of one sequence.")
@click.option("--num-seqs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Full-length sequences the KV cache must hold at once.")
@click.option("--num-layers", type=click.IntRange(min=1), default=None, help="Decoder layers [rule of thumb].")
@click.option("--num-kv-heads", type=click.IntRange(min=1), default=None, help="KV heads [8].")
@click.option("--head-dim", type=click.IntRange(min=1), default=None, help="Head dimension [128].")
@click.option("--device-memory-gb", type=float, default=None,
              help="Memory per device [the site profile's device_memory_gb; local: RAM / cores].")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0.05, 1.0), default=0.9, show_default=True)
@click.option("--overhead-gb", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Activations, graphs and runtime per device.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
def size_cmd(tokens, deadline, budget, throughput, metric, site, tp, pp, model_params, dtype, kv_cache_dtype,
             max_model_len, num_seqs, num_layers, num_kv_heads, head_dim, device_memory_gb,
             gpu_memory_utilization, overhead_gb, as_json):
    """Size a fleet for a token budget and deadline, or find the smallest TP that fits a model."""
    fleet = any(v is not None for v in (tokens, deadline, budget, throughput))
    memory = model_params is not None or max_model_len is not None
    if fleet == memory:
        raise UsageError("give either --tokens/--deadline/--throughput (fleet size) or "
                         "--model-params/--max-model-len (memory fit)")
    dpn, device_gb, site_name = site_facts(site, device_memory_gb)
    if budget is not None:
        click.echo(_budget(tokens, budget, throughput, metric, tp * pp, dpn, site_name, as_json))
        return
    if fleet:
        if tokens is None or deadline is None or throughput is None:
            raise UsageError("fleet sizing needs all of --tokens, --deadline and --throughput")
        if not tokens > 0 or not deadline > 0:
            raise UsageError("--tokens and --deadline must be positive")
        tps = throughput_of(throughput, metric)
        n = instances_needed(tokens, tps, deadline)
        hours = tokens / (tps * 3600.0 * n)
        out = {"instances": n, "tokens_per_s_per_instance": tps, "hours_with_instances": hours,
               "margin_pct": 100.0 * (deadline - hours) / deadline}
        line = (f"{n} instances at {tps:.4g} tok/s each finish {tokens:.4g} tokens in {hours:.3g} h "
                f"(deadline {deadline:g} h, margin {out['margin_pct']:.1f} %)")
        if dpn:
            k = tp * pp
            nodes = nodes_for(n, k, dpn)
            fit = nodes * (dpn // k) if k <= dpn else n
            out.update({"site": site_name, "nodes": nodes, "devices_per_instance": k, "instances_that_fit": fit,
                        "hours_if_nodes_full": tokens / (tps * 3600.0 * fit)})
            line += (f"; on {site_name}: {nodes} nodes ({dpn} devices each, {k} per instance; "
                     f"{fit} instances fit, {out['hours_if_nodes_full']:.3g} h if all run)")
        click.echo(json.dumps(out, indent=2) if as_json else line)
        return
    if model_params is None or max_model_len is None:
        raise UsageError("the memory fit needs both --model-params and --max-model-len")
    if not model_params > 0:
        raise UsageError("--model-params must be positive, e.g. 70e9")
    if device_gb is None:
        raise UsageError("device memory unknown: give --device-memory-gb, or a --site whose profile sets "
                         "device_memory_gb")
    res = fit_tp(model_params, dtype, max_model_len, device_gb, dpn or 8, layers=num_layers,
                 kv_heads=num_kv_heads, head_dim=head_dim, kv_dtype=kv_cache_dtype, seqs=num_seqs,
                 utilization=gpu_memory_utilization, overhead_gb=overhead_gb)
    res.update({"site": site_name or None, "device_memory_gb": device_gb})
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"TP {res['tensor_parallel_size']} x PP {res['pipeline_parallel_size']} "
               f"({res['devices']} devices, {res['nodes']} node(s)): {res['per_device_gb']:.1f} GB per device of "
               f"{res['usable_gb']:.1f} usable (weights {res['weights_gb']:.1f} GB, "
               f"KV cache {res['kv_cache_gb']:.1f} GB for {num_seqs} x {max_model_len} tokens at "
               f"{res['kv_bytes_per_token']} B/token: {res['layers']} layers, {res['kv_heads']} KV heads x "
               f"{res['head_dim']}); room for {res['extra_sequences']} more full sequences")


def _budget(tokens, budget, throughput, metric, k, dpn, site_name, as_json) -> str:
    """Whether `tokens` fit in `budget` node-hours at a measured rate (a chain's, or per-instance tokens/s)."""
    from aegis.plan.size import node_hour_rate, node_hours_needed

    if tokens is None or throughput is None:
        raise UsageError("--budget needs --tokens and --throughput (tokens/s per instance, a bench result, or an "
                         "aegis serve directory)")
    if not tokens > 0 or not budget > 0:
        raise UsageError("--tokens and --budget must be positive")
    rate = node_hour_rate(throughput)
    if rate is not None:
        needed, source = tokens / rate, f"{rate:,.0f} tokens per node-hour measured by the service"
    else:
        if not dpn:
            raise UsageError("a per-instance throughput needs --site (devices per node) to count node-hours")
        tps = throughput_of(throughput, metric)
        needed = node_hours_needed(tokens, tps, k, dpn)
        rate, source = tokens / needed, f"{tps:.4g} tok/s per instance of {k} device(s) on {site_name}"
    fits = needed <= budget
    out = {"tokens": tokens, "budget_node_hours": budget, "node_hours_needed": needed, "fits": fits,
           "tokens_per_node_hour": rate, "margin_pct": 100.0 * (budget - needed) / budget}
    if as_json:
        return json.dumps(out, indent=2)
    verdict = "fits" if fits else "does NOT fit"
    return (f"{tokens:.4g} tokens need {needed:.4g} node-hours at {source}: {verdict} in {budget:g} node-hours "
            f"(margin {out['margin_pct']:.1f} %)")
