"""SGLang's server (`python -m sglang.launch_server`): command lines and feature flags.

SGLang reads its API key only from `--api-key` or from a `--config` YAML
file; aegis writes the key into a per-instance config file (mode 0600) in the
run directory and passes `--config`, so the key is on no command line.
"""
from __future__ import annotations

import json

from aegis.engines.base import Engine, EngineLaunch, flag_value

DEVICE = {"gpu": None, "xpu": "xpu", "cpu": "cpu"}  # --device per site device kind (None: its default)


class SGLangEngine(Engine):
    name = "sglang"
    server = "sglang.launch_server"
    api_key_env = ""  # SGLang has no such variable: see files()
    loaded_marker = b"Load weight end"  # SGLang's model runner logs "Load weight end. type=..."
    # Device masks it honours (not VLLM_CPU_OMP_THREADS_BIND, the local site's CPU-core mask).
    vendors = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")

    def command(self, launch: EngineLaunch) -> list[str]:
        argv = [launch.python, "-m", "sglang.launch_server", "--model-path", launch.model,
                "--host", launch.host, "--port", str(launch.port),
                "--tp-size", str(launch.tensor_parallel_size), "--pp-size", str(launch.pipeline_parallel_size)]
        if flag_value(launch.extra_args, "--served-model-name") is None:
            argv += ["--served-model-name", launch.served_name]
        device = DEVICE.get(launch.device_kind)
        if device and flag_value(launch.extra_args, "--device") is None:
            argv += ["--device", device]
        argv.append("--enable-metrics")  # /metrics is off unless asked for
        if launch.nnodes > 1:
            # Every node runs the same command; rank 0 serves HTTP, the others join via dist-init-addr.
            argv += ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank),
                     "--dist-init-addr", f"{launch.master_addr}:{launch.master_port}"]
        if launch.api_key:
            argv += ["--config", launch.config_path("sglang.yaml")]
        return argv + self.feature_args(launch) + list(launch.extra_args)

    def feature_args(self, launch: EngineLaunch) -> list[str]:
        opts = launch.options
        args: list[str] = []
        args += self.lora_args(launch, "--lora-paths", {"max_loras": "--max-loras-per-batch",
                                                       "max_cpu_loras": "--max-loaded-loras"})
        if opts.enable_prefix_caching is False:
            args.append("--disable-radix-cache")  # the radix (prefix) cache is on by default
        if opts.kv_cache_dtype is not None:
            args += ["--kv-cache-dtype", "fp8_e4m3" if opts.kv_cache_dtype == "fp8" else opts.kv_cache_dtype]
        if opts.enable_expert_parallel:
            args += ["--ep-size", str(launch.tensor_parallel_size)]  # experts spread over the TP group
        if opts.all2all_backend:
            args += ["--moe-a2a-backend", opts.all2all_backend]
        if opts.enable_eplb:
            args.append("--enable-eplb")
        if opts.num_redundant_experts is not None:
            args += ["--ep-num-redundant-experts", str(opts.num_redundant_experts)]
        return args

    def key_env(self, api_key: str) -> dict[str, str]:
        return {}

    def files(self, launch: EngineLaunch, api_key: str | None) -> dict[str, str]:
        if not (launch.api_key and api_key):
            return {}
        # YAML of one string: JSON quoting is valid YAML and escapes anything in the key.
        return {launch.config_path("sglang.yaml"): f"api-key: {json.dumps(api_key)}\n"}
