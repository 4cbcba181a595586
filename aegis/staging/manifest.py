"""The staging manifest and completion marker, byte-compatible with csrc/manifest.c and csrc/stage.c.

A manifest lists every entry of SRC, sorted by path bytes, one line each after the
header ``aegis-manifest 1``::

    <type> <size> <mode, 4 octal digits> <mtime_ns> <path>[ <link target>]

type ``d`` directory (size 0, mtime 0), ``f`` regular file, ``l`` symlink kept as a
link (size 0, mode 0777, mtime 0). Bytes ``\\``, ``<= 0x20`` and ``0x7f`` in paths are
written as ``\\xHH``. Regular files form one byte stream in manifest order; chunk k
is bytes ``[k*C, (k+1)*C)`` of that stream. The manifest digest is the SHA-256 of
its bytes; the content key is the SHA-256 of ``"<bytes> <chunk size> <crc hex...>"``.

Symlinks: a relative link whose target stays inside SRC is recreated as the same
link; any other link to a regular file is followed and staged as a copy of that file;
a dangling link or one to a directory outside SRC is an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from aegis.errors import StageError

HEADER = b"aegis-manifest 1\n"
MARKER = ".aegis-stage.json"
RECORD = ".aegis-stage.manifest"  # what aegis wrote into a directory DEST: the manifest of that staging


@dataclass
class Entry:
    """One manifest line."""

    type: str
    path: bytes
    size: int = 0
    mode: int = 0
    mtime_ns: int = 0
    target: bytes = b""
    offset: int = 0


@dataclass
class Manifest:
    """All entries plus the byte stream index of the regular files."""

    entries: list[Entry] = field(default_factory=list)
    total: int = 0
    nfiles: int = 0
    stream: list[int] = field(default_factory=list)
    full: Stream | None = field(default=None, repr=False, compare=False)  # every file with bytes (index())
    _by_path: dict[bytes, Entry] = field(default_factory=dict)

    def index(self) -> Manifest:
        """Compute stream offsets; call after building or parsing."""
        self.total = self.nfiles = 0
        self.stream = []
        for i, e in enumerate(self.entries):
            if e.type != "f":
                continue
            self.nfiles += 1
            e.offset = self.total
            self.total += e.size
            if e.size:
                self.stream.append(i)
        self.full = Stream(self, self.stream)
        return self

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """Yield (entry index, file offset, length, offset in chunk) for stream bytes [start, end)."""
        assert self.full is not None
        return self.full.pieces(start, end)

    def substream(self, pick: list[bool] | bytes | None = None) -> Stream:
        """The stream of the files i with bytes and pick[i] (all of them without pick)."""
        return Stream(self, [i for i in self.stream if pick is None or pick[i]])

    def by_path(self) -> dict[bytes, Entry]:
        """Entries by path (built once)."""
        if len(self._by_path) != len(self.entries):
            self._by_path = {e.path: e for e in self.entries}
        return self._by_path

    def serialize(self) -> bytes:
        """The shared text layout."""
        out = [HEADER]
        for e in self.entries:
            line = b"%s %d %04o %d %s" % (e.type.encode(), e.size, e.mode, e.mtime_ns, _escape(e.path))
            if e.type == "l":
                line += b" " + _escape(e.target)
            out.append(line + b"\n")
        return b"".join(out)

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Inverse of serialize()."""
        if not data.startswith(HEADER):
            raise StageError("internal: the broadcast manifest has an unknown format")
        m = cls()
        for line in data[len(HEADER):].split(b"\n"):
            if not line:
                continue
            parts = line.split(b" ")
            e = Entry(parts[0].decode(), _unescape(parts[4]), int(parts[1]), int(parts[2], 8), int(parts[3]))
            if e.type == "l":
                e.target = _unescape(parts[5])
            m.entries.append(e)
        return m.index()


class Stream:
    """A byte stream over some of the regular files of a manifest, in manifest order: all of them (what the
    marker's chunk CRCs cover) or only those a re-stage sends."""

    def __init__(self, m: Manifest, files: list[int]):
        self.m, self.files, self.off = m, files, []
        self.total = 0
        for i in files:
            self.off.append(self.total)
            self.total += m.entries[i].size

    def chunks(self, chunk: int) -> int:
        return -(-self.total // chunk)

    def chunk_len(self, chunk: int, k: int) -> int:
        return min(chunk, self.total - k * chunk)

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """Yield (entry index, file offset, length, offset in chunk) for stream bytes [start, end)."""
        import bisect

        j = max(0, bisect.bisect_right(self.off, start) - 1)
        pos = start
        while j < len(self.files) and pos < end:
            size = self.m.entries[self.files[j]].size
            if self.off[j] + size > pos:
                off = pos - self.off[j]
                take = min(size - off, end - pos)
                yield self.files[j], off, take, pos - start
                pos += take
            j += 1


def _escape(b: bytes) -> bytes:
    return b"".join(b"\\x%02x" % c if c == 0x5C or c <= 0x20 or c == 0x7F else bytes((c,)) for c in b)


def _unescape(b: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(b):
        if b[i] == 0x5C and i + 3 < len(b) and b[i + 1:i + 2] == b"x":
            out.append(int(b[i + 2:i + 4], 16))
            i += 4
        else:
            out.append(b[i])
            i += 1
    return bytes(out)


def _link_is_internal(rel: bytes, target: bytes) -> bool:
    if not target or target.startswith(b"/"):
        return False
    depth = rel.count(b"/")
    for part in target.split(b"/"):
        if part == b"..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in (b"", b"."):
            depth += 1
    return True


def _file_entry(rel: bytes, st: os.stat_result) -> Entry:
    return Entry("f", rel, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns)


def walk(src: str, single_name: bytes | None = None) -> Manifest:
    """Build the manifest of SRC (a directory, or a file staged under single_name)."""
    m = Manifest()
    try:
        st = os.stat(src)
    except OSError as exc:
        raise StageError(f"cannot read SRC {src}: {exc.strerror}") from None
    if single_name is not None:
        if not stat.S_ISREG(st.st_mode):
            raise StageError(f"SRC {src} is not a regular file")
        m.entries.append(_file_entry(single_name, st))
        return m.index()
    _walk(os.fsencode(src), b"", m)
    m.entries.sort(key=lambda e: e.path)
    return m.index()


def _walk(abs_dir: bytes, rel_dir: bytes, m: Manifest) -> None:
    try:
        names = [d.name for d in os.scandir(abs_dir)]
    except OSError as exc:
        raise StageError(f"cannot read directory {os.fsdecode(abs_dir)}: {exc.strerror}") from None
    for name in names:
        a = abs_dir + b"/" + name
        r = rel_dir + b"/" + name if rel_dir else name
        shown = os.fsdecode(a)
        try:
            st = os.lstat(a)
        except OSError as exc:
            raise StageError(f"cannot stat {shown}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(a)
            if _link_is_internal(r, target):
                m.entries.append(Entry("l", r, 0, 0o777, 0, target))
                continue
            try:
                st = os.stat(a)
            except OSError:
                raise StageError(f"symlink {shown} -> {os.fsdecode(target)} is dangling") from None
            if not stat.S_ISREG(st.st_mode):
                raise StageError(f"symlink {shown} -> {os.fsdecode(target)} points outside SRC to something "
                                 "that is not a regular file; stage that directory itself")
            m.entries.append(_file_entry(r, st))
        elif stat.S_ISDIR(st.st_mode):
            m.entries.append(Entry("d", r, 0, stat.S_IMODE(st.st_mode), 0))
            _walk(a, r, m)
        elif stat.S_ISREG(st.st_mode):
            m.entries.append(_file_entry(r, st))
        else:
            raise StageError(f"{shown} is not a regular file, directory or symlink; remove it from SRC")


def content_key(total: int, chunk: int, crcs: list[int]) -> str:
    """SHA-256 over the stream length, chunk size and per-chunk CRC-32 values."""
    text = b"%d %d %s" % (total, chunk, "".join(f"{c:08x}" for c in crcs).encode())
    return hashlib.sha256(text).hexdigest()


def marker_text(digest: str, key: str, m: Manifest, chunk: int, crcs: list[int]) -> str:
    """The completion marker, the same bytes as csrc/stage.c writes."""
    return json.dumps({
        "aegis_stage": 1, "manifest_sha256": digest, "content_key": key, "bytes": m.total,
        "files": m.nfiles, "chunk_size": chunk, "crc32": "".join(f"{c:08x}" for c in crcs),
    }) + "\n"


def write_marker(path: str, text: str | bytes) -> None:
    """Write the marker (or the record) under a temporary name, then rename it into place."""
    tmp = path + ".aegis-part"
    try:
        with open(tmp, "wb") as fh:
            fh.write(text.encode() if isinstance(text, str) else text)
        os.rename(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_record(path: str) -> Manifest | None:
    """The manifest recorded by the last staging into a directory DEST, or None."""
    try:
        with open(path, "rb") as fh:
            return Manifest.parse(fh.read())
    except (OSError, StageError, ValueError, IndexError):
        return None


def read_marker(path: str) -> dict | None:
    """The marker's fields, or None when it is missing or unreadable."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        crc = data["crc32"]
        data["crcs"] = [int(crc[i:i + 8], 16) for i in range(0, len(crc), 8)]
        return data if data.get("aegis_stage") == 1 and data["chunk_size"] > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tree_matches(root: str, m: Manifest) -> bool:
    """Every entry exists under root with the recorded type, size, mtime and link target."""
    broot = os.fsencode(root)
    for e in m.entries:
        p = broot + b"/" + e.path
        try:
            st = os.lstat(p)
        except OSError:
            return False
        if e.type == "d" and not stat.S_ISDIR(st.st_mode):
            return False
        if e.type == "f" and (not stat.S_ISREG(st.st_mode) or st.st_size != e.size or st.st_mtime_ns != e.mtime_ns):
            return False
        if e.type == "l" and (not stat.S_ISLNK(st.st_mode) or os.readlink(p) != e.target):
            return False
    return True


def hf_model_dir(dest: str, repo: str) -> str:
    """DEST/models--ORG--NAME, the Hugging Face hub-cache directory of repo."""
    return os.path.join(dest, "models--" + repo.replace("/", "--"))
