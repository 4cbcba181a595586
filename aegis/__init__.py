"""aegis: serve and measure large language models on supercomputers (library: aegis.run, aegis.config.resolve)."""
from __future__ import annotations

import logging
from typing import Any

from aegis._version import __version__

# A library's logger: silent until an application adds a handler (the CLI shows warnings: aegis/cli.py).
logging.getLogger("aegis").addHandler(logging.NullHandler())

# The library's front door, imported on first use so that `import aegis` (and `aegis --help`) stays cheap.
_LAZY = {"Run": "aegis.run", "submit": "aegis.run", "resolve_config": "aegis.config.resolve",
         "RunDir": "aegis.rundir", "EndpointsFile": "aegis.launch.endpoints"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aegis' has no attribute {name!r}")
