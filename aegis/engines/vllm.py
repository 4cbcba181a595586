"""vLLM's OpenAI-compatible server: command lines, feature flags and the version differences that matter."""
from __future__ import annotations

import json
from pathlib import Path

from aegis.engines import ray as ray_backend
from aegis.engines.base import Engine, EngineLaunch, flag_value
from aegis.engines.options import version_tuple

# The one place for vLLM version differences: (first version with the new spelling, old, new).
# Flags were checked against `vllm serve --help=all` of 0.32 and the docs of 0.10/0.11 (docs/engines.md).
VERSIONS = {
    "all2all_backend": ((0, 11), "env:VLLM_ALL2ALL_BACKEND", "--all2all-backend"),
    "num_redundant_experts": ((0, 11), "--num-redundant-experts", "--eplb-config"),
}
KEY_GUARD = "aegis_keyguard.KeyGuard"  # aegis/engines/guard/aegis_keyguard.py, imported by vLLM (--middleware)
GUARD_DIR = str(Path(__file__).resolve().parent / "guard")
MODELINFO_SCRIPT = str(Path(GUARD_DIR) / "aegis_modelinfo.py")  # fills vLLM's model-info cache, then execs
MULTINODE = (0, 12)  # the first release with the multiprocessing multi-node mode (--nnodes, --headless)
# The one table of vLLM's Prometheus metric names aegis reads (the bench's scraper, tests):
# key -> (first version with the new name, old, new); the V1 engine before 0.11 used "gpu_" names.
METRICS = {
    "num_requests_running": ((0, 0), "vllm:num_requests_running", "vllm:num_requests_running"),
    "num_requests_waiting": ((0, 0), "vllm:num_requests_waiting", "vllm:num_requests_waiting"),
    "kv_cache_usage": ((0, 11), "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    "num_preemptions": ((0, 0), "vllm:num_preemptions_total", "vllm:num_preemptions_total"),
    "prefix_cache_queries": ((0, 11), "vllm:gpu_prefix_cache_queries_total", "vllm:prefix_cache_queries_total"),
    "prefix_cache_hits": ((0, 11), "vllm:gpu_prefix_cache_hits_total", "vllm:prefix_cache_hits_total"),
    "prompt_tokens": ((0, 0), "vllm:prompt_tokens_total", "vllm:prompt_tokens_total"),
    "generation_tokens": ((0, 0), "vllm:generation_tokens_total", "vllm:generation_tokens_total"),
    "lora_requests_info": ((0, 0), "vllm:lora_requests_info", "vllm:lora_requests_info"),
}
# Older spellings still seen from some servers (counters exposed without "_total"), tried last.
METRIC_ALIASES = {
    "num_preemptions": ("vllm:num_preemptions",),
    "prefix_cache_queries": ("vllm:gpu_prefix_cache_queries",),
    "prefix_cache_hits": ("vllm:gpu_prefix_cache_hits",),
}


def spelling(table: dict, key: str, version: str | None) -> str:
    first, old, new = table[key]
    return new if version_tuple(version) >= first else old


def metric_name(key: str, version: str | None = None) -> str:
    """The Prometheus name of a vLLM metric in `version` (None: current releases)."""
    return spelling(METRICS, key, version)


def metric_names(key: str) -> tuple[str, ...]:
    """Every spelling of a vLLM metric, newest first: what a scraper of servers of any version looks for."""
    _, old, new = METRICS[key]
    return tuple(dict.fromkeys((new, old, *METRIC_ALIASES.get(key, ()))))


class VLLMEngine(Engine):
    name = "vllm"
    server = "vllm serve"
    api_key_env = "VLLM_API_KEY"  # read by vLLM's server: the key never appears on a command line
    metrics_path = "/metrics"  # num_requests_running, prompt/generation_tokens_total (METRICS)
    loaded_marker = b"Loading weights took"  # vLLM's model loaders (default_loader.py) log this
    lora_json_items = True  # --lora-modules: an item with a comma is parsed as JSON (cli_args.LoRAParserAction)
    # modelinfo_cache: ALCF's Aurora known issue (vLLM's model inspection subprocess crashes on XPU; the
    # model-info cache must be filled first): aegis_modelinfo.py fills it in-process before the server starts.
    workarounds = ("modelinfo_cache",)

    def command(self, launch: EngineLaunch) -> list[str]:
        ray = launch.nnodes > 1 and launch.options.multinode_backend == "ray"
        if ray and launch.node_rank > 0:
            return ray_backend.start_argv(launch)  # this node joins the instance's Ray cluster; the head runs vLLM
        if launch.nnodes > 1:
            # Multi-node: `vllm serve` (the api_server module ignores --headless).
            argv = [launch.script("vllm"), "serve", launch.model]
        else:
            argv = [launch.python, "-m", "vllm.entrypoints.openai.api_server", "--model", launch.model]
        argv += ["--host", launch.host, "--port", str(launch.port),
                 "--tensor-parallel-size", str(launch.tensor_parallel_size),
                 "--pipeline-parallel-size", str(launch.pipeline_parallel_size)]
        if flag_value(launch.extra_args, "--served-model-name") is None:
            argv += ["--served-model-name", launch.served_name]
        if ray:
            argv += ["--distributed-executor-backend", "ray"]  # ALCF's vLLM page, multi-node
        elif launch.nnodes > 1:
            # vLLM's multiprocessing multi-node mode: every node runs the same command; the
            # head (rank 0) serves the API, the others run headless workers.
            argv += ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank),
                     "--master-addr", str(launch.master_addr), "--master-port", str(launch.master_port)]
            if launch.node_rank > 0:
                argv.append("--headless")
        if launch.api_key:  # vLLM's --api-key leaves /invocations, /tokenize, /metrics ... open: guard them all
            argv += ["--middleware", KEY_GUARD]
        argv += self.feature_args(launch) + list(launch.extra_args)
        if "modelinfo_cache" in launch.workarounds:
            argv = [launch.python, MODELINFO_SCRIPT, "--model", launch.model, "--", *argv]
        return ray_backend.wait_argv(launch, argv) if ray else argv

    def companions(self, launch: EngineLaunch) -> list[tuple[str, list[str]]]:
        if launch.nnodes > 1 and launch.options.multinode_backend == "ray" and launch.node_rank == 0:
            return [("ray-head", ray_backend.start_argv(launch))]
        return []

    def companion_env(self, launch: EngineLaunch) -> dict[str, str]:
        if launch.nnodes > 1 and launch.options.multinode_backend == "ray" and launch.node_rank == 0:
            return {"RAY_ADDRESS": ray_backend.address(launch)}  # ray.init("auto") finds this instance's cluster
        return {}

    def check_multinode(self, options, device_kind: str = "gpu") -> str | None:
        version = options.engine_version
        if options.multinode_backend == "ray":
            if device_kind == "cpu":
                return ("vLLM's CPU platform cannot use Ray (its ray_device_key is empty); set "
                        "multinode_backend: native")
            return None
        if version_tuple(version) < MULTINODE:
            return (f"vLLM {version} has no multi-node mode (--nnodes/--node-rank arrived with "
                    f"vllm-project/vllm#23691, vLLM {'.'.join(map(str, MULTINODE))}); keep TP x PP within one "
                    "node, set multinode_backend: ray, or set engine_python to a newer vLLM and engine_version "
                    "to its version")
        return None

    def feature_args(self, launch: EngineLaunch) -> list[str]:
        """The flags of the named features (engine keys of the config)."""
        opts, version = launch.options, launch.options.engine_version
        args: list[str] = []
        args += self.lora_args(launch, "--lora-modules", {"max_loras": "--max-loras",
                                                         "max_cpu_loras": "--max-cpu-loras"})
        if opts.enable_prefix_caching is not None:
            args.append("--enable-prefix-caching" if opts.enable_prefix_caching else "--no-enable-prefix-caching")
        if opts.kv_cache_dtype is not None:
            args += ["--kv-cache-dtype", opts.kv_cache_dtype]
        if opts.enable_expert_parallel:
            args.append("--enable-expert-parallel")
        if opts.all2all_backend and spelling(VERSIONS, "all2all_backend", version).startswith("--"):
            args += ["--all2all-backend", opts.all2all_backend]
        if opts.enable_eplb:
            args.append("--enable-eplb")
        if opts.num_redundant_experts is not None:
            flag = spelling(VERSIONS, "num_redundant_experts", version)
            value = (json.dumps({"num_redundant_experts": opts.num_redundant_experts})
                     if flag == "--eplb-config" else str(opts.num_redundant_experts))
            args += [flag, value]
        return args

    def path_env(self, launch: EngineLaunch) -> dict[str, str]:
        return {"PYTHONPATH": GUARD_DIR} if launch.api_key else {}  # where vLLM imports the key guard from

    def feature_env(self, launch: EngineLaunch) -> dict[str, str]:
        opts = launch.options
        where = spelling(VERSIONS, "all2all_backend", opts.engine_version)
        if opts.all2all_backend and where.startswith("env:"):
            return {where[4:]: opts.all2all_backend}
        return {}
