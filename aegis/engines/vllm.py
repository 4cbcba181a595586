"""vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`)."""
from __future__ import annotations

import os

from aegis.engines.base import Engine, EngineLaunch


def _flag_value(args: list[str], flag: str):
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


class VLLMEngine(Engine):
    name = "vllm"
    api_key_env = "VLLM_API_KEY"  # read by vLLM's server: the key never appears on a command line

    def served_name(self, model: str, extra_args: list[str], short_name: str = "") -> str:
        return _flag_value(extra_args, "--served-model-name") or super().served_name(model, extra_args, short_name)

    def command(self, launch: EngineLaunch) -> list[str]:
        if launch.nnodes > 1:
            # Multi-node: `vllm serve` (the api_server module ignores --headless); the script sits
            # next to the engine's Python (or on PATH when that is a bare name).
            folder = os.path.dirname(launch.python)
            argv = [os.path.join(folder, "vllm") if folder else "vllm", "serve", launch.model]
        else:
            argv = [launch.python, "-m", "vllm.entrypoints.openai.api_server", "--model", launch.model]
        argv += ["--host", launch.host, "--port", str(launch.port),
                "--tensor-parallel-size", str(launch.tensor_parallel_size),
                "--pipeline-parallel-size", str(launch.pipeline_parallel_size)]
        if _flag_value(launch.extra_args, "--served-model-name") is None:
            argv += ["--served-model-name", launch.served_name]
        if launch.nnodes > 1:
            # vLLM's multiprocessing multi-node mode: every node runs the same command; the
            # head (rank 0) serves the API, the others run headless workers.
            argv += ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank),
                     "--master-addr", str(launch.master_addr), "--master-port", str(launch.master_port)]
            if launch.node_rank > 0:
                argv.append("--headless")
        return argv + list(launch.extra_args)
