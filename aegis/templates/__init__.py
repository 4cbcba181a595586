"""Jinja2 templates shipped as package data (job scripts, modulefile), and the one environment that renders them."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jinja2


def environment(**filters: Callable[[Any], str]) -> jinja2.Environment:
    """A strict Jinja2 environment over this package's templates, with the given filters."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("aegis", "templates"), undefined=jinja2.StrictUndefined,
                             autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(filters)
    return env
