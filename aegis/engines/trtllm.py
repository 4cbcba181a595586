"""TensorRT-LLM's server (`trtllm-serve`): command lines, MPI start for multi-node instances, features.

One node: `trtllm-serve MODEL ...` (it spawns its own MPI workers). Several
nodes: the ranks must form one MPI world, so the head node's agent starts
`mpirun -np <world> -H <node>:<slots>,... trtllm-llmapi-launch trtllm-serve ...`
and the other nodes' agents start nothing for that instance. trtllm-serve has
no API key: aegis refuses it unless the config sets `api_key: false`.
Prefix reuse and the KV-cache type go into a per-instance
`--extra_llm_api_options` YAML file in the run directory.
"""
from __future__ import annotations

import json

from aegis.engines.base import Engine, EngineLaunch, flag_value


class TRTLLMEngine(Engine):
    name = "trtllm"
    api_key_env = ""
    served_name_flag = "--served_model_name"
    supports_api_key = False
    server = "trtllm-serve"
    vendors = ("CUDA_VISIBLE_DEVICES",)  # NVIDIA GPUs only

    def command(self, launch: EngineLaunch) -> list[str] | None:
        if launch.nnodes > 1 and launch.node_rank > 0:
            return None  # started by the head's mpirun
        serve = [launch.script("trtllm-serve"), launch.model, "--host", launch.host, "--port", str(launch.port),
                 "--backend", "pytorch", "--tp_size", str(launch.tensor_parallel_size),
                 "--pp_size", str(launch.pipeline_parallel_size)]
        if flag_value(launch.extra_args, "--served_model_name") is None:
            serve += ["--served_model_name", launch.served_name]
        serve += self.feature_args(launch) + list(launch.extra_args)
        if launch.nnodes == 1:
            return serve
        world = launch.tensor_parallel_size * launch.pipeline_parallel_size
        hosts = ",".join(f"{h}:{launch.devices_per_node}" for h in launch.node_hosts)
        argv = ["mpirun", "-np", str(world), "-H", hosts, "--bind-to", "none"]
        for var in launch.visibility_vars:  # the device mask reaches the remote ranks too
            argv += ["-x", var]
        return argv + [launch.script("trtllm-llmapi-launch")] + serve

    def feature_args(self, launch: EngineLaunch) -> list[str]:
        args: list[str] = []
        if launch.options.enable_expert_parallel:
            args += ["--ep_size", str(launch.tensor_parallel_size)]  # experts spread over the TP group
        if self._llm_api_options(launch):
            args += ["--extra_llm_api_options", launch.config_path("trtllm.yaml")]
        return args

    def _llm_api_options(self, launch: EngineLaunch) -> dict:
        opts = launch.options
        kv: dict = {}
        if opts.enable_prefix_caching is not None:
            kv["enable_block_reuse"] = opts.enable_prefix_caching
        if opts.kv_cache_dtype is not None:
            kv["dtype"] = opts.kv_cache_dtype
        return {"kv_cache_config": kv} if kv else {}

    def files(self, launch: EngineLaunch, api_key: str | None) -> dict[str, str]:
        data = self._llm_api_options(launch)
        if not data:
            return {}
        lines = ["kv_cache_config:"] + [f"  {k}: {json.dumps(v)}" for k, v in data["kv_cache_config"].items()]
        return {launch.config_path("trtllm.yaml"): "\n".join(lines) + "\n"}
