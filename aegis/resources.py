"""Locate shipped data (templates/, site_configs/) installed or in a source checkout."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def data_dir(name: str) -> Path:
    """The directory of `aegis.<name>` when installed, else `<checkout>/<name>`."""
    try:
        spec = importlib.util.find_spec(f"aegis.{name}")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / name
