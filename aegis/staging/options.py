"""Options of `aegis stage`, validated once and turned into either implementation's argv."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from aegis.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?B)?\s*$")
_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MIN_CHUNK, MAX_CHUNK = 64 << 10, 1 << 30


def parse_size(text: str | int) -> int:
    """'16M' -> 16777216 (K, M, G are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"{text!r} is not a size (e.g. 16M, 512K, 1G)")
    return int(float(m.group(1)) * _MULT[m.group(2).lower()])


@dataclass
class StageOptions:
    """Everything one staging run needs; the same fields on every rank."""

    src: str
    dest: str
    chunk_size: int = 16 << 20
    window: int = 8
    threads: int = 4
    verify: bool = False
    force: bool = False
    unpack: bool = False
    hf_repo: str | None = None
    hf_revision: str | None = None
    json: bool = False
    per_rank: bool = False
    private_dir: str | None = None  # DEST's private ancestor: created 0700, or refused unless ours and 0700
    lock_timeout: int = 1800  # seconds to wait for another staging into the same DEST
    lock_stall: int = 300  # give up at once when that staging has made no progress for this long (0: never)

    def validate(self) -> StageOptions:
        """Raise UsageError for values both implementations reject."""
        if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
            raise UsageError(f"--chunk-size {self.chunk_size} is not between 64K and 1G (e.g. 16M)")
        if not 1 <= self.window <= 1024:
            raise UsageError("--window must be between 1 and 1024")
        if not 1 <= self.threads <= 256:
            raise UsageError("--threads must be between 1 and 256")
        if not 0 <= self.lock_timeout <= 7 * 86400:
            raise UsageError(f"--lock-timeout {self.lock_timeout} is not a number of seconds (0 to 604800)")
        if not 0 <= self.lock_stall <= 7 * 86400:
            raise UsageError(f"--lock-stall {self.lock_stall} is not a number of seconds (0 to 604800)")
        if self.hf_repo is not None:
            org, _, name = self.hf_repo.partition("/")
            if not org or not name or "/" in name or ".." in self.hf_repo:
                raise UsageError(f"--hf-repo {self.hf_repo} is not of the form ORG/NAME")
            if self.unpack:
                raise UsageError("--hf-repo and --unpack cannot be combined")
        src = os.path.realpath(self.src)
        dest = os.path.realpath(self.dest.split("{", 1)[0] or ".")
        if dest == src or dest.startswith(src.rstrip("/") + "/"):
            raise UsageError(f"DEST {self.dest} is inside SRC {self.src}: each staging would copy the last one; "
                             "choose a DEST outside SRC")
        if self.private_dir is not None and not self.dest.startswith(self.private_dir.rstrip("/") + "/"):
            raise UsageError(f"--private-dir {self.private_dir} must hold DEST ({self.dest})")
        if self.hf_revision is not None and (not self.hf_revision or "/" in self.hf_revision
                                             or ".." in self.hf_revision):
            raise UsageError(f"--hf-revision {self.hf_revision} must be a plain name")
        return self

    def argv(self) -> list[str]:
        """Options as command-line arguments (for aegis-stage or `aegis stage`), then SRC DEST."""
        out = ["--chunk-size", str(self.chunk_size), "--window", str(self.window), "--threads", str(self.threads)]
        for flag, on in (("--verify", self.verify), ("--force", self.force), ("--unpack", self.unpack),
                         ("--json", self.json), ("--per-rank", self.per_rank)):
            if on:
                out.append(flag)
        if self.hf_repo:
            out += ["--hf-repo", self.hf_repo]
        if self.hf_revision:
            out += ["--hf-revision", self.hf_revision]
        if self.private_dir:
            out += ["--private-dir", self.private_dir]
        if self.lock_timeout != StageOptions.lock_timeout:
            out += ["--lock-timeout", str(self.lock_timeout)]
        if self.lock_stall != StageOptions.lock_stall:
            out += ["--lock-stall", str(self.lock_stall)]
        return out + ["--", self.src, self.dest]
