"""A terminal progress bar that follows requests.jsonl while a run goes on."""
from __future__ import annotations

import asyncio
import sys
import time


class Progress:
    """Counts finished requests (and errors) by tailing the results file."""

    def __init__(self, path: str, expected: int | None, duration: float | None, t0: float,
                 enabled: bool = True, stream=None, interval: float = 0.5):
        self.path, self.expected, self.duration, self.t0 = path, expected, duration, t0
        self.enabled, self.stream, self.interval = enabled, stream or sys.stderr, interval
        self.done = self.errors = 0
        self._pos = 0
        self._partial = b""

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._pos)
                data = fh.read()
        except OSError:
            return
        self._pos += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line:
                self.done += 1
                if b'"success":false' in line:
                    self.errors += 1

    def line(self, width: int = 30) -> str:
        elapsed = max(time.perf_counter() - self.t0, 0.0)
        if self.expected:
            frac = min(self.done / self.expected, 1.0)
            total = f"{self.done}/{self.expected}"
        elif self.duration:
            frac = min(elapsed / self.duration, 1.0)
            total = f"{self.done}"
        else:
            frac, total = 0.0, f"{self.done}"
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return (f"\r[{bar}] {100 * frac:5.1f}% {total} req  {rate:7.2f} req/s  "
                f"errors {self.errors}  {elapsed:6.1f}s")

    async def run(self, stop: asyncio.Event) -> None:
        while True:
            self.poll()
            if self.enabled:
                self.stream.write(self.line())
                self.stream.flush()
            if stop.is_set():
                break
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
