"""Find a model's Hugging Face config.json on this machine and read its attention heads, KV heads and layers."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# The keys vLLM reads, in its order (vllm/config/model.py: get_num_attention_heads and
# verify_with_parallel_config read hf_text_config.num_attention_heads; get_total_num_hidden_layers reads
# num_hidden_layers; get_total_num_kv_heads tries n_head_kv, num_kv_heads, num_key_value_heads,
# multi_query_group_num and falls back to the attention heads). transformers maps older spellings
# (GPT-2's n_head / n_layer, ChatGLM's num_layers) onto these names through each config class's
# attribute_map; a raw config.json still has the old spelling, so they are read as fallbacks.
HEADS_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
LAYERS_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
KV_HEADS_KEYS = ("n_head_kv", "num_kv_heads", "num_key_value_heads", "multi_query_group_num")


@dataclass(frozen=True)
class ModelShape:
    """What a config.json says about the layout a model accepts (None: the file does not say)."""

    path: str  # the config.json read
    heads: int | None
    kv_heads: int | None
    layers: int | None
    heads_key: str = "num_attention_heads"  # where in the file they were read (messages)
    layers_key: str = "num_hidden_layers"


def hub_dirs(hf_home: str | None = None) -> list[Path]:
    """Hugging Face hub caches to search: the config's hf_home, HF_HUB_CACHE, HF_HOME, the default (in order).

    huggingface_hub's own rule (constants.py): HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub. The job script exports the
    config's hf_home as HF_HOME, so that cache comes first.
    """
    env = os.environ
    xdg = env.get("XDG_CACHE_HOME") or "~/.cache"
    candidates = [
        os.path.join(hf_home, "hub") if hf_home else None,
        env.get("HF_HUB_CACHE"),
        os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else None,
        os.path.join(xdg, "huggingface", "hub"),
    ]
    out: list[Path] = []
    for c in candidates:
        if c and "$" not in c:  # a value the job expands at run time ($SCRATCH/hf) cannot be read here
            p = Path(os.path.expanduser(c))
            if p not in out:
                out.append(p)
    return out


def repo_dir_name(model: str) -> str | None:
    """'org/name' -> 'models--org--name' (the hub cache's folder of a repository); None for a path."""
    if model.startswith(("/", "~", ".")) or model.count("/") > 1 or not model.strip("/"):
        return None
    return "models--" + model.replace("/", "--")


def snapshot_config(repo: Path) -> Path | None:
    """config.json of a hub-cache repository folder: the snapshot refs/main names, else the newest one."""
    snapshots = repo / "snapshots"
    try:
        ref = (repo / "refs" / "main").read_text().strip()
    except OSError:
        ref = ""
    if ref and (snapshots / ref / "config.json").is_file():
        return snapshots / ref / "config.json"
    try:
        found = [p for p in snapshots.glob("*/config.json") if p.is_file()]
    except OSError:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime, p.name), default=None)


def _in_dir(folder: Path, repo_name: str | None) -> Path | None:
    """config.json in a model folder, a hub-cache repository folder, or a hub folder holding the repository."""
    if (folder / "config.json").is_file():
        return folder / "config.json"
    if (folder / "snapshots").is_dir():
        return snapshot_config(folder)
    if repo_name and (folder / repo_name).is_dir():
        return snapshot_config(folder / repo_name)
    return None


def find_config(model: str, model_source: str | None = None,
                hf_home: str | None = None) -> tuple[Path | None, list[str]]:
    """(the config.json found or None, the places looked in, in order).

    Looked in: model_source when it is a local directory; `model` when it is a local path; the
    repository's folder in each hub cache of hub_dirs().
    """
    looked: list[str] = []
    repo_name = repo_dir_name(model)
    folders: list[Path] = []
    if model_source and "$" not in model_source:
        folders.append(Path(os.path.expanduser(model_source)))
    local = Path(os.path.expanduser(model))
    if repo_name is None or local.is_dir():  # a path, or a folder named like a repository (loaded first)
        folders.append(local)
    for folder in folders:
        looked.append(str(folder))
        if folder.is_dir():
            found = _in_dir(folder, repo_name)
            if found:
                return found, looked
    if repo_name:
        for hub in hub_dirs(hf_home):
            looked.append(str(hub))
            found = snapshot_config(hub / repo_name) if (hub / repo_name).is_dir() else None
            if found:
                return found, looked
    return None, looked


def _positive(data: dict, keys: tuple[str, ...]) -> tuple[int | None, str]:
    """The first of `keys` that holds a positive integer: (value, key); (None, keys[0]) if none does."""
    for key in keys:
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None, keys[0]


def read_shape(path: Path) -> ModelShape:
    """Heads, KV heads and layers of a config.json; ValueError (its reason) when it cannot be read.

    A multimodal model keeps its language model's values in `text_config`, and that is what vLLM
    checks (vllm/transformers_utils/config.py get_hf_text_config: transformers' get_text_config(),
    which must have num_attention_heads); a text model has them at the top level.
    """
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    prefix = ""
    text = data.get("text_config")
    if isinstance(text, dict) and _positive(text, HEADS_KEYS)[0] is not None:
        data, prefix = text, "text_config."
    heads, heads_key = _positive(data, HEADS_KEYS)
    layers, layers_key = _positive(data, LAYERS_KEYS)
    return ModelShape(path=str(path), heads=heads, kv_heads=_positive(data, KV_HEADS_KEYS)[0] or heads,
                      layers=layers, heads_key=prefix + heads_key, layers_key=prefix + layers_key)
