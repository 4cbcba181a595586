"""What the agent would start, rendered without starting it: shared by the engine rendering tests.

`render_ranks` runs the real path (site profile -> config -> plan ->
`aegis.launch.ranks.build_ranks`, node by node) and returns each node's ranks
(argv, environment, ...). test_render.py pins the result in golden files;
test_vllm_parser.py hands every vLLM argv to vLLM's own argument parser.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from aegis.config.schema import Config, resolve
from aegis.config.sites import Site, load_site
from aegis.errors import ConfigError
from aegis.launch.ranks import Rank, build_ranks
from aegis.plan.placement import Plan, make_plan
from aegis.rundir import RunDir

SITE_PROFILES = Path(__file__).parents[2] / "aegis" / "config" / "site_profiles"
SITES = sorted(p.stem for p in SITE_PROFILES.glob("*.yaml"))
KEY = "k3y-not-a-real-key"
HOSTS = {"aurora": ["x4102c5s2b0n0", "x4102c5s2b0n1"], "polaris": ["x3004c0s7b0n0", "x3004c0s7b0n1"],
         "frontier": ["frontier00001", "frontier00002"], "h200": ["gpu-a01", "gpu-a02"], "local": ["localhost"],
         "local-sim": ["localhost"]}
EXTRA = {"vllm": ["--max-num-seqs", "128"], "sglang": ["--max-running-requests", "128"],
         "trtllm": ["--max_batch_size", "128"],
         "sim": ["--max-num-seqs", "128", "--decode-ms", "5"]}  # each engine's own spelling, passed through
NOISE = ("GLOO_SOCKET_IFNAME", "VLLM_HOST_IP")  # depend on this machine's interfaces


def config(engine: str, shape: str, devices_per_node: int) -> dict:
    """The golden files' config: single-node with LoRA, prefix caching and fp8 KV; multi-node with EP."""
    raw = {"engine": engine, "engine_python": "/soft/engine/bin/python", "enable_prefix_caching": True,
           "kv_cache_dtype": "fp8"}
    if engine == "trtllm":
        raw["api_key"] = False
    if engine == "sim":  # the simulator has no KV-cache types or expert parallelism
        del raw["kv_cache_dtype"]
    if shape == "single":
        raw.update(model="meta-llama/Llama-3.1-8B-Instruct", instances=2, extra_args=EXTRA[engine])
        if engine != "trtllm":
            raw["lora"] = {"adapters": {"sql": "/adapters/sql", "chat": "/adapters/chat"}, "max_loras": 1,
                           "max_cpu_loras": 2, "max_lora_rank": 16}
    else:
        raw.update(model="deepseek-ai/DeepSeek-V3", tensor_parallel_size=devices_per_node,
                   pipeline_parallel_size=2, enable_expert_parallel=engine != "sim")
        if engine not in ("trtllm", "sim"):
            raw.update(all2all_backend="deepep_low_latency" if engine == "vllm" else "deepep", enable_eplb=True,
                       num_redundant_experts=32)
    return raw


@functools.cache
def _resolved_site(site_name: str) -> Site:
    return load_site(site_name).resolved()  # reads every profile (pure-Python YAML): ~50 ms


def site_and_hosts(site_name: str, shape: str) -> tuple[Site, list[str]]:
    """The resolved site (a copy of one loaded once per process) and the allocation's host names: one node
    for "single", two for "multi"."""
    site = _resolved_site(site_name).model_copy(deep=True)
    hosts = HOSTS.get(site_name) or [f"{site_name}-node0", f"{site_name}-node1"]
    return site, (hosts if shape == "multi" else hosts[:1])


@dataclass
class NodeRanks:
    """The engine processes one node's agent would start."""

    index: int
    host: str
    ranks: list[Rank]


@dataclass
class Rendered:
    """Every node's ranks for one config, or the one-line refusal of the node where build_ranks refused."""

    site: Site
    cfg: Config
    plan: Plan
    hosts: list[str]
    nodes: list[NodeRanks] = field(default_factory=list)
    refused: str | None = None


def render_ranks(run_dir: Path, site: Site, hosts: list[str], raw: dict, api_key: str | None) -> Rendered:
    """Resolve `raw`, plan it on `hosts` and build each node's ranks as its agent would (run dir `run_dir`).

    Stops at the first node whose ranks are refused (ConfigError): `refused` holds the message.
    """
    cfg = resolve(raw)
    plan = make_plan(site, cfg, nodes=len(hosts))
    out = Rendered(site=site, cfg=cfg, plan=plan, hosts=hosts)
    for index, host in enumerate(hosts):
        try:
            ranks = build_ranks(RunDir(run_dir), index, site, cfg, plan, hosts, api_key)
        except ConfigError as exc:
            out.refused = str(exc)
            return out
        for rank in ranks:
            assert not api_key or api_key not in " ".join(rank.argv)  # the key is never on a command line
        out.nodes.append(NodeRanks(index, host, ranks))
    return out
