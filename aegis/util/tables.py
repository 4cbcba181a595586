"""The one plain-text table printer: left-aligned columns two spaces apart, the last one unpadded."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Render `rows` under `headers` (columns in `right` are right-aligned: numbers)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        if len(headers) - 1 not in right:
            parts[-1] = row[-1]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
