"""aegis's simulated OpenAI server as an engine: rehearse a fleet, a harness or a gateway without GPUs.

One process per instance (`python -m aegis.testing.simserver`), started, supervised,
health-gated and stopped exactly like vLLM; it serves /v1/completions, chat, /v1/models,
/health and /metrics with vLLM's metric names, and requires the run's API key (read from
AEGIS_SIM_API_KEY, never the command line). Its behaviour comes from the model's
`extra_args` (the simulator's own flags: --decode-ms, --max-num-seqs, --startup-seconds,
...), checked with the simulator's own parser. It runs with the agent's Python (aegis is
installed there), ignores device masks and takes its planned devices only as slots.
"""
from __future__ import annotations

import sys

from aegis.engines.base import Engine, EngineLaunch


class SimEngine(Engine):
    name = "sim"
    server = "aegis's simulated server"
    api_key_env = "AEGIS_SIM_API_KEY"
    loaded_marker = b"Loading weights took"  # the simulator logs it like vLLM
    served_name_flag = "--model"
    metrics_path = "/metrics"  # vLLM's names (aegis/testing/simserver.py)

    def command(self, launch: EngineLaunch) -> list[str] | None:
        if launch.node_rank > 0:  # a spanning instance: its head rank serves the whole instance
            return None
        argv = [sys.executable, "-m", "aegis.testing.simserver", "--host", launch.host,
                "--port", str(launch.port), "--model", launch.served_name]
        opts = launch.options
        if launch.lora_adapters:
            argv += ["--lora-modules", ",".join(launch.lora_adapters)]
        if opts.lora is not None and opts.lora.max_loras is not None:
            argv += ["--max-loras", str(opts.lora.max_loras)]
        if opts.lora is not None and opts.lora.max_cpu_loras is not None:
            argv += ["--max-cpu-loras", str(opts.lora.max_cpu_loras)]
        if opts.enable_prefix_caching is False:
            argv.append("--no-prefix-cache")
        return argv + [a for a in launch.extra_args]

    def check_site(self, visibility_vars: list[str]) -> str | None:
        return None  # no devices: it runs anywhere

    def check_args(self, args: list[str]) -> str | None:
        """Why the simulator's own parser refuses these extra_args, or None."""
        from aegis.testing.simserver import arg_error

        return arg_error(args)
