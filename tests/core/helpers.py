"""Shared helpers for the core tests: run the real CLI entry point in-process."""
from __future__ import annotations

import textwrap
from pathlib import Path

from aegis.cli import main


def run_cli(capsys, *args):
    """Run `aegis ARGS...` through the console-script entry point; return (code, out, err)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path
