"""Engine options as data: the named serving features, which engine has which, and their checks.

A model's config names features (LoRA, prefix caching, fp8 KV cache, expert
parallelism, ...) with engine-neutral keys; each engine module maps them to
its own flags. `SUPPORT` is the one table of which engine has which key; a key
set for an engine without it is a one-line config error.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from aegis.errors import ConfigError

ENGINE_NAMES = ("vllm", "sglang", "trtllm", "sim")

# key -> engines that have it (everything else is refused for that engine).
SUPPORT = {
    "lora": ("vllm", "sglang", "sim"),
    "enable_prefix_caching": ("vllm", "sglang", "trtllm", "sim"),
    "kv_cache_dtype": ("vllm", "sglang", "trtllm"),
    "enable_expert_parallel": ("vllm", "sglang", "trtllm"),
    "all2all_backend": ("vllm", "sglang"),
    "enable_eplb": ("vllm", "sglang"),
    "num_redundant_experts": ("vllm", "sglang"),
    "multinode_backend": ("vllm",),
}
# How the nodes of an instance that spans nodes are started: "native" (the engine's own multi-node mode)
# or "ray" (a Ray cluster per instance, vLLM's --distributed-executor-backend ray; aegis/engines/ray.py).
MultinodeBackend = Literal["native", "ray"]
# Why a key is missing for an engine, shown in the error.
MISSING_WHY = {
    ("lora", "trtllm"): "trtllm-serve cannot address adapters by model name",
    ("all2all_backend", "trtllm"): "TensorRT-LLM picks its MoE communication itself",
    ("enable_eplb", "trtllm"): "its load balancer is configured in an extra_llm_api_options file",
    ("num_redundant_experts", "trtllm"): "its load balancer is configured in an extra_llm_api_options file",
}
# KV-cache data types each engine accepts ("auto" = the model's dtype).
KV_CACHE_DTYPES = {
    "vllm": ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"),
    "sglang": ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
    "trtllm": ("auto", "fp8"),
}
WORD_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class LoraOptions(BaseModel):
    """LoRA adapters of one model: named paths and/or a directory with one adapter per subdirectory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapters: dict[StrictStr, StrictStr] = Field(default_factory=dict)  # name -> path
    adapters_dir: StrictStr | None = None  # one adapter per subdirectory (named after it)
    max_loras: StrictInt | None = Field(None, gt=0)  # resident on the device
    max_cpu_loras: StrictInt | None = Field(None, gt=0)  # cached in host memory
    max_lora_rank: StrictInt | None = Field(None, gt=0)

    @field_validator("adapters")
    @classmethod
    def _paths(cls, v):
        if any(CONTROL_RE.search(p) for p in v.values()):
            raise ValueError("adapter paths must not contain control characters or newlines")
        return v

    def resolved(self) -> dict[str, str]:
        """name -> path of every adapter: the named ones, then each subdirectory of adapters_dir (sorted)."""
        out = {name: os.path.expanduser(path) for name, path in self.adapters.items()}
        if self.adapters_dir:
            root = Path(self.adapters_dir).expanduser()
            try:
                subdirs = sorted(p for p in root.iterdir() if p.is_dir())
            except OSError as exc:
                raise ConfigError(f"lora.adapters_dir: cannot list {root}: {exc.strerror or exc}") from None
            for sub in subdirs:
                if (sub / "adapter_config.json").exists() and ADAPTER_NAME_RE.match(sub.name):
                    out.setdefault(sub.name, str(sub))
            if not out:
                raise ConfigError(f"lora.adapters_dir: {root} has no adapter subdirectories "
                                  "(each needs an adapter_config.json)")
        return out


class EngineOptions(BaseModel):
    """The serving features one model asks for (config keys); None/False means the engine's default.

    `ModelSpec` in aegis/config/schema.py inherits these fields, so the config and the engines share one list.
    """

    model_config = ConfigDict(extra="forbid")

    lora: LoraOptions | None = None
    enable_prefix_caching: StrictBool | None = None
    kv_cache_dtype: StrictStr | None = None
    enable_expert_parallel: StrictBool = False
    all2all_backend: StrictStr | None = None
    enable_eplb: StrictBool = False
    num_redundant_experts: StrictInt | None = Field(default=None, ge=0)
    engine_version: StrictStr | None = None  # e.g. "0.10.1": selects flag spellings where they changed
    multinode_backend: MultinodeBackend | None = None  # None: the site's choice (multinode_backends)

    def set_keys(self) -> list[str]:
        """The feature keys this model sets (in SUPPORT order)."""
        return [k for k in SUPPORT if getattr(self, k) not in (None, False)]

    def engine_options(self) -> EngineOptions:
        """Just the feature keys (of a ModelSpec, which has more)."""
        return EngineOptions(**{k: getattr(self, k) for k in EngineOptions.model_fields})


def problem(engine: str, opts: EngineOptions) -> str | None:
    """One line naming the first option `engine` does not have or a value it refuses, or None."""
    for key in opts.set_keys():
        if engine not in SUPPORT[key]:
            why = MISSING_WHY.get((key, engine))
            have = ", ".join(e for e in SUPPORT[key])
            return (f"{key}: engine {engine!r} has no such option"
                    + (f" ({why})" if why else "") + f"; it is available with: {have}"
                    + "; pass the engine's own flags in extra_args instead")
    if opts.kv_cache_dtype is not None and opts.kv_cache_dtype not in KV_CACHE_DTYPES[engine]:
        return (f"kv_cache_dtype: {opts.kv_cache_dtype!r} is not a KV-cache type of {engine} "
                f"(choose from {', '.join(KV_CACHE_DTYPES[engine])})")
    if opts.all2all_backend is not None and not WORD_RE.match(opts.all2all_backend):
        return f"all2all_backend: {opts.all2all_backend!r} is not a backend name"
    needs_ep = [k for k in ("all2all_backend", "enable_eplb") if getattr(opts, k)]
    if needs_ep and not opts.enable_expert_parallel:
        return f"{needs_ep[0]}: only applies with expert parallelism; set enable_expert_parallel: true"
    if opts.num_redundant_experts is not None and not opts.enable_eplb:
        return "num_redundant_experts: only applies with expert load balancing; set enable_eplb: true"
    if opts.lora is not None:
        lora = opts.lora
        if not lora.adapters and not lora.adapters_dir:
            return "lora: name the adapters with 'adapters: {name: path}' or 'adapters_dir'"
        for name in lora.adapters:
            if not ADAPTER_NAME_RE.match(str(name)):
                return (f"lora.adapters: {name!r} is not a usable adapter name "
                        "(letters, digits, '.', '_', '-')")
        if lora.max_loras and lora.max_cpu_loras and lora.max_cpu_loras < lora.max_loras:
            return (f"lora: max_cpu_loras ({lora.max_cpu_loras}) must be at least max_loras "
                    f"({lora.max_loras})")
    return None


def version_tuple(version: str | None) -> tuple[int, ...]:
    """'0.10.1.1' -> (0, 10, 1, 1); None -> a version newer than any (the current flags)."""
    if not version:
        return (10 ** 6,)
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts) or (10 ** 6,)
