"""Engine keys in the config: validation per engine, flag mapping, vLLM version table, adapters, endpoints."""
from __future__ import annotations

import json
import re

import pytest

from aegis.config.schema import resolve
from aegis.config.sites import load_site
from aegis.engines import EngineLaunch, get_engine
from aegis.engines.options import SUPPORT, EngineOptions, LoraOptions
from aegis.engines.vllm import metric_name
from aegis.errors import ConfigError
from aegis.launch.allocation import Allocation
from aegis.launch.head import Head
from aegis.plan.placement import make_plan
from aegis.rundir import RunDir


def error(raw: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        resolve(raw)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("raw,expected", [
    ({"engine": "trtllm", "api_key": False, "lora": {"adapters": {"a": "/a"}}},
     "lora: engine 'trtllm' has no such option (trtllm-serve cannot address adapters by model name); "
     "it is available with: vllm, sglang"),
    ({"engine": "trtllm", "api_key": False, "enable_expert_parallel": True, "all2all_backend": "x"},
     "all2all_backend: engine 'trtllm' has no such option"),
    ({"engine": "trtllm"}, "trtllm-serve cannot require an API key; set api_key: false"),
    ({"kv_cache_dtype": "fp4"}, "kv_cache_dtype: 'fp4' is not a KV-cache type of vllm (choose from auto,"),
    ({"engine": "trtllm", "api_key": False, "kv_cache_dtype": "fp8_e5m2"}, "is not a KV-cache type of trtllm"),
    ({"all2all_backend": "pplx"}, "all2all_backend: only applies with expert parallelism; set enable_expert_parallel"),
    ({"enable_expert_parallel": True, "enable_eplb": True, "num_redundant_experts": -1},
     "num_redundant_experts: input should be greater than or equal to 0"),
    ({"enable_expert_parallel": True, "num_redundant_experts": 8}, "set enable_eplb: true"),
    ({"lora": {}}, "lora: name the adapters with 'adapters: {name: path}' or 'adapters_dir'"),
    ({"lora": {"adapters": {"a b": "/x"}}}, "lora.adapters: 'a b' is not a usable adapter name"),
    ({"lora": {"adapters": {"a": "/x"}, "max_loras": 4, "max_cpu_loras": 2}}, "must be at least max_loras"),
    ({"lora": {"adapters": {"a": "/x"}, "max_lora": 4}}, "lora.max_lora: unknown key"),
    ({"engine": "sglang", "extra_vllm_args": ["--x"]}, "extra_vllm_args: is for engine vllm; use extra_args"),
    ({"extra_args": ["--a"], "extra_vllm_args": ["--b"]}, "set extra_args or extra_vllm_args, not both"),
    ({"engine": "tgi"}, "engine: Input should be 'vllm', 'sglang', 'trtllm' or 'sim'"),
    ({"prefix_caching": True}, "prefix_caching: unknown key (did you mean 'enable_prefix_caching'?)"),
])
def test_engine_keys_are_validated_with_one_clear_line(raw, expected):
    assert expected in error({"model": "m", **raw})


def test_every_key_is_in_the_config_and_the_docs():
    from pathlib import Path

    from aegis.config.schema import MODEL_KEYS, ModelSpec

    docs = (Path(__file__).parents[2] / "docs" / "engines.md").read_text()
    for key in SUPPORT:
        assert key in ModelSpec.model_fields and key in MODEL_KEYS
        assert re.search(rf"^\| `{key}\b", docs, re.M), f"docs/engines.md has no table row for {key}"


def launch(**kw) -> EngineLaunch:
    base = dict(model="m", served_name="m", host="h", port=8000, tensor_parallel_size=8, pipeline_parallel_size=1)
    return EngineLaunch(**{**base, **kw})


def test_vllm_version_table_picks_old_and_new_spellings():
    engine = get_engine("vllm")
    opts = dict(enable_expert_parallel=True, all2all_backend="deepep_low_latency", enable_eplb=True,
                num_redundant_experts=32)
    new = launch(options=EngineOptions(**opts))
    old = launch(options=EngineOptions(**opts, engine_version="0.10.1.1"))
    assert engine.feature_args(new) == ["--enable-expert-parallel", "--all2all-backend", "deepep_low_latency",
                                        "--enable-eplb", "--eplb-config", '{"num_redundant_experts": 32}']
    assert engine.feature_env(new) == {}
    assert engine.feature_args(old) == ["--enable-expert-parallel", "--enable-eplb", "--num-redundant-experts", "32"]
    assert engine.feature_env(old) == {"VLLM_ALL2ALL_BACKEND": "deepep_low_latency"}
    assert metric_name("prefix_cache_hits", "0.10.2") == "vllm:gpu_prefix_cache_hits_total"
    assert metric_name("prefix_cache_hits", "0.32.0") == metric_name("prefix_cache_hits") == \
        "vllm:prefix_cache_hits_total"


def test_prefix_caching_off_per_engine():
    off = EngineOptions(enable_prefix_caching=False)
    assert get_engine("vllm").feature_args(launch(options=off)) == ["--no-enable-prefix-caching"]
    assert get_engine("sglang").feature_args(launch(options=off)) == ["--disable-radix-cache"]
    trt = launch(options=off, instance="m-0", config_dir="/run/engine")
    assert get_engine("trtllm").files(trt, None) == {
        "/run/engine/m-0.trtllm.yaml": "kv_cache_config:\n  enable_block_reuse: false\n"}


def test_served_name_flag_per_engine():
    assert get_engine("sglang").served_name("/p/m", ["--served-model-name", "x"], "m") == "x"
    assert get_engine("trtllm").served_name("/p/m", ["--served_model_name", "y"], "m") == "y"
    assert get_engine("trtllm").served_name("/p/m", [], "m") == "m"


def test_adapters_dir_lists_adapter_subdirectories(tmp_path):
    for name in ("b", "a", "not-an-adapter"):
        (tmp_path / name).mkdir()
    for name in ("a", "b"):
        (tmp_path / name / "adapter_config.json").write_text("{}")
    lora = LoraOptions(adapters={"first": "/x"}, adapters_dir=str(tmp_path))
    assert lora.resolved() == {"first": "/x", "a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    with pytest.raises(ConfigError, match=r"lora.adapters_dir: cannot list .*missing"):
        LoraOptions(adapters_dir=str(tmp_path / "missing")).resolved()
    with pytest.raises(ConfigError, match="has no adapter subdirectories"):
        LoraOptions(adapters_dir=str(tmp_path / "not-an-adapter")).resolved()


def test_endpoints_file_lists_lora_adapters(tmp_path):
    site = load_site("h200").resolved()
    cfg = resolve({"pack_models": True, "models": [
        {"model": "meta-llama/Llama-3.1-8B-Instruct", "lora": {"adapters": {"sql": "/a/sql", "chat": "/a/chat"}}},
        {"model": "Qwen/Qwen3-8B"}]})
    plan = make_plan(site, cfg, nodes=1)
    head = Head(RunDir(tmp_path), site, cfg, plan, Allocation("slurm", "42", ["gpu-a01"]), echo=lambda m: None)
    head._prepare()
    head._publish()
    doc = json.loads((tmp_path / "endpoints.json").read_text())
    by_model = {i["model"]: i["lora_adapters"] for i in doc["instances"]}
    assert by_model == {"meta-llama/Llama-3.1-8B-Instruct": ["sql", "chat"], "Qwen/Qwen3-8B": []}
