"""Waiting in an event loop until the process is asked to stop (SIGINT or SIGTERM)."""
from __future__ import annotations

import asyncio
import signal


async def until_stopped() -> None:
    """Return once SIGINT or SIGTERM arrives (servers then clean up and exit 0)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
