"""The one plain-text table printer: left-aligned columns two spaces apart, the last one unpadded."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_row(cells: Sequence[Any], widths: Sequence[int], right: Sequence[int] = (), sep: str = "  ") -> str:
    """One line of a table whose column widths are known (also a table printed row by row as results come).

    Columns in `right` are right-aligned (numbers); the last column is not padded unless right-aligned.
    """
    cells = ["" if c is None else str(c) for c in cells]
    parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
    if len(widths) - 1 not in right:
        parts[-1] = cells[-1]
    return sep.join(parts).rstrip()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Render `rows` under `headers` (columns in `right` are right-aligned: numbers)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(format_row(row, widths, right) for row in cells)
