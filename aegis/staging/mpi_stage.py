"""The mpi4py implementation of `aegis stage`: the same protocol, options and marker as csrc/stage.c.

One rank per node (the lowest on each node, or every rank with --per-rank) takes
part; rank 0 walks SRC and broadcasts the manifest; chunk k is read by leader
k mod N and travels around the ring of leaders (each receives from its left and
forwards to its right), up to --window chunks in flight; I/O threads read, checksum
(CRC-32) and write while the main thread drives MPI with non-blocking calls.
"""
from __future__ import annotations

import array
import fcntl
import hashlib
import json
import os
import queue
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import zlib

from aegis.errors import StageError
from aegis.staging import manifest as mf
from aegis.staging.options import StageOptions

TRAILER = 16
MAX_FAIL_LINES = 20
LOCK_REPORT_S = 30  # how often a staging waiting for another one says so
HEARTBEAT_S = 1  # how often a lock holder writes its progress into the lock file
SILENT_S = 3  # a holder whose heartbeat is this old is stopped or hung, not merely idle
READ, WRITE = 1, 2


def _now() -> float:
    return time.monotonic()


class _Node:
    """State of one participating (leader) rank."""

    # Set by _run_leader once the manifest has been broadcast.
    m: mf.Manifest
    single: bool
    digest: str
    C: int
    K: int  # chunks of the whole stream (m.full), what the marker's CRCs cover
    crc: list[int]
    tx: mf.Stream  # the files this staging sends over the ring (all of them on a first staging)
    KT: int
    txcrc: list[int]  # CRC-32 of each chunk of tx, as its reader computed it
    fs: list[_FileState]
    need: list[bool]  # need[i]: this node writes entry i (it is missing or differs at DEST)
    src: bytes
    key: str

    def __init__(self, opts: StageOptions, comm, wrank: int, host: str):
        self.o, self.comm, self.wrank, self.host = opts, comm, wrank, host
        self.lrank, self.n = comm.Get_rank(), comm.Get_size()
        self.lock = threading.Lock()
        self.failed, self.reason, self.skip = False, "", False
        self.prepared = self.resend_all = False
        self.sent, self.files_sent, self.writers, self.summed = False, 0, False, 0
        self.known: bytearray = bytearray()  # known[k]: this node's last marker holds the CRC of chunk k
        self.lastcrc: list[int] = []
        self.lock_fd, self.lock_lost, self.lock_file = -1, False, ""
        self.progress, self.phase = 0, "start"  # shown to a waiting staging by the lock file's heartbeat
        self.hb: threading.Thread | None = None
        self.hb_stop = threading.Event()
        self.write_delay = int(os.environ.get("AEGIS_STAGE_TEST_WRITE_DELAY_MS") or 0) / 1000
        self.times = dict(read=0.0, network=0.0, write=0.0, checksum=0.0, verify=0.0)
        self.repaired = 0
        corrupt = os.environ.get("AEGIS_STAGE_TEST_CORRUPT", "")
        chunk, _, rank = corrupt.partition("@")
        self.corrupt_chunk = int(chunk) if chunk else -1
        self.corrupt_rank = int(rank) if rank else -1

    # ------------------------------------------------------------ helpers
    def fail(self, reason: str) -> None:
        with self.lock:
            if not self.failed:
                self.failed, self.reason = True, reason

    def add(self, phase: str, t0: float) -> None:
        with self.lock:
            self.times[phase] += _now() - t0

    def chunk_len(self, k: int) -> int:
        return min(self.C, self.m.total - k * self.C)

    def tx_len(self, k: int) -> int:
        return self.tx.chunk_len(self.C, k)

    def tmp_name(self, i: int) -> bytes:
        path = self.m.entries[i].path
        d, _, _ = path.rpartition(b"/")
        name = b".aegis-part.%s.%d" % (self.digest[:8].encode(), i)
        return os.path.join(self.broot, d, name) if d else os.path.join(self.broot, name)

    def read_chunk(self, base: bytes, single: bool, k: int, buf: memoryview, st: mf.Stream | None = None) -> None:
        """Read chunk k of stream st (default: the whole stream) of the tree (or file) at base into buf;
        OSError on failure."""
        st = st or self.m.full
        assert st is not None
        for i, off, n, at in st.pieces(k * self.C, k * self.C + st.chunk_len(self.C, k)):
            path = base if single else base + b"/" + self.m.entries[i].path
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                done = 0
                while done < n:
                    got = os.preadv(fd, [buf[at + done:at + n]], off + done)
                    if got <= 0:
                        raise OSError(0, "file shrank while staging", os.fsdecode(path))
                    done += got
            finally:
                os.close(fd)

    # ------------------------------------------------------------ paths and markers
    def expand(self, path: str) -> str:
        """{rank}, {node} and {host} of this rank in `path`."""
        return path.replace("{rank}", str(self.wrank)).replace("{node}", str(self.lrank)).replace("{host}", self.host)

    def setup_paths(self) -> None:
        o = self.o
        self.dest = self.expand(o.dest)
        self.hf_model = None
        self.record = ""
        if o.unpack:
            self.root = os.path.dirname(self.dest) or "."
            self.marker = os.path.join(self.dest, mf.MARKER)
        elif self.single:
            self.root = os.path.dirname(self.dest) or "."
            name = os.fsdecode(self.m.entries[0].path)
            self.marker = os.path.join(self.root, f".aegis-stage.{name}.json")
        elif o.hf_repo:
            self.hf_model = mf.hf_model_dir(self.dest, o.hf_repo)
            self.hf_rev = (o.hf_revision or self.digest)[:40]
            self.root = os.path.join(self.hf_model, "snapshots", self.hf_rev)
            self.marker = os.path.join(self.root, mf.MARKER)
            self.record = os.path.join(self.root, mf.RECORD)
        else:
            self.root = self.dest
            self.marker = os.path.join(self.root, mf.MARKER)
            self.record = os.path.join(self.root, mf.RECORD)
        self.broot = os.fsencode(self.root)
        self.vbase = self.broot + b"/" + self.m.entries[0].path if self.single else self.broot

    def drop_stale_parts(self) -> None:
        """Remove temporaries an earlier, interrupted staging of other content left in DEST."""
        mine = f".aegis-part.{self.digest[:8]}."
        for folder, _, names in os.walk(self.root):
            for name in names:
                if name.startswith(".aegis-part.") and not name.startswith(mine):
                    try:
                        os.unlink(os.path.join(folder, name))
                    except OSError:
                        pass

    def file_current(self, e: mf.Entry) -> bool:
        """Is regular file e already at DEST as SRC has it (same size and mtime)?"""
        try:
            st = os.lstat(self.broot + b"/" + e.path)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns

    def plan_files(self) -> tuple[int, int, int]:
        """Which files must be written (need[i]): missing or different at DEST, or all with --force.
        Returns (bytes, files) to write and the bytes their old versions free."""
        want = nwant = freed = 0
        for i, e in enumerate(self.m.entries):
            if e.type != "f":
                continue
            self.need[i] = self.o.force or self.o.unpack or self.resend_all or not self.file_current(e)
            if self.need[i]:
                want += e.size
                nwant += 1
                freed += _freeable(self.broot, e.path)
        return want, nwant, freed

    def check_space(self, want: int, nwant: int, freed: int) -> None:
        """Fail when writing `want` bytes cannot fit, counting what removing old versions frees first."""
        try:
            vs = os.statvfs(self.root)
        except OSError:
            return
        avail = vs.f_bavail * vs.f_frsize
        if avail + freed >= want:
            return
        plus = f" plus {_fmt_bytes(freed)} in old versions it replaces or removes" if freed else ""
        raise StageError(f"not enough space in {self.root}: writing {nwant} of {self.m.nfiles} files needs "
                         f"{_fmt_bytes(want)}, {_fmt_bytes(avail)} free{plus} (short by "
                         f"{_fmt_bytes(want - avail - freed)}); free space there or stage to another DEST")

    def make_dirs(self) -> None:
        """Create the directories of the manifest (after what is gone was removed)."""
        for e in self.m.entries:
            if e.type == "d":
                p = self.broot + b"/" + e.path
                try:
                    os.mkdir(p, 0o700)
                except FileExistsError:
                    if not os.path.isdir(p):
                        raise StageError(f"cannot create directory {os.fsdecode(p)}: "
                                         "something else is in the way") from None
                os.chmod(p, os.stat(p).st_mode | 0o700)

    def prepare(self) -> None:
        """Get DEST ready for the files this node writes: check it is writable and has room for them
        (nothing is changed when it has not), then remove the marker, what the last staging wrote and SRC
        no longer has, and the old versions of the files to rewrite; record the new manifest."""
        self.prepared = True
        try:
            _mkdirs(self.root)
            probe = os.path.join(self.root, f".aegis-part.{self.digest[:8]}.probe")
            try:
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
            except OSError as exc:
                raise StageError(f"cannot write in {self.root}: {exc.strerror}") from None
            os.unlink(probe)
            self.drop_stale_parts()
            old = mf.read_record(self.record) if self.record else None
            gone = [e for e in old.entries if _gone(e, self.m)] if old else []
            want, nwant, freed = self.plan_files()
            freed += sum(_freeable(self.broot, e.path) for e in gone if e.type == "f")
            self.check_space(want, nwant, freed)
            try:
                os.unlink(self.marker)
            except OSError:
                pass
            for e in reversed(gone):  # children before their directory
                _remove(self.broot, e.path)
            for i, e in enumerate(self.m.entries):
                if self.need[i]:
                    _remove(self.broot, e.path)
            self.make_dirs()
            if self.record:
                try:
                    mf.write_marker(self.record, self.m.serialize())
                except OSError as exc:
                    raise StageError(f"cannot write {self.record}: {exc.strerror}") from None
        except StageError as exc:
            self.fail(str(exc))
        except OSError as exc:
            self.fail(f"cannot create directory {exc.filename}: {exc.strerror}")

    # ------------------------------------------------------------ one staging per DEST at a time
    def lock_path(self) -> tuple[str, str, str]:
        """(lock file, its directory, DEST made absolute): .aegis-lock.<sha256 of DEST, 16 hex> in the
        private directory, else beside DEST."""
        dest = self.dest if self.dest.startswith("/") else os.getcwd() + "/" + self.dest
        dest = re.sub("/+", "/", dest)
        dest = dest.rstrip("/") or "/"
        folder = self.expand(self.o.private_dir) if self.o.private_dir else (os.path.dirname(dest) or "/")
        name = ".aegis-lock." + hashlib.sha256(os.fsencode(dest)).hexdigest()[:16]
        return os.path.join(folder, name), folder, dest

    def lock_open(self) -> None:
        try:
            self.lock_fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self.lock_fd = -1
            self.fail(f"cannot open the lock file {self.lock_file}: {exc.strerror}; remove it, or pass --private-dir")

    def lock_try(self) -> bool:
        """Lock the file; a holder removes it as it finishes, so a lock on a removed file does not count."""
        while self.lock_fd >= 0:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            try:
                a, b = os.fstat(self.lock_fd), os.lstat(self.lock_file)
                if (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev):
                    return True
            except OSError:
                pass
            os.close(self.lock_fd)
            self.lock_open()
        return self.failed  # a lock file that cannot be opened fails the node, which then waits for nothing

    def read_holder(self) -> _Holder | None:
        """What the holder of the lock wrote into the lock file: "pid host since DEST", then, from a staging
        that reports its progress, "progress BYTES CHANGED ALIVE PHASE" (unix times of its last progress and
        its last heartbeat)."""
        try:
            first, _, rest = os.pread(self.lock_fd, 8192, 0).decode(errors="replace").partition("\n")
            pid, host, since = first.split(" ", 3)[:3]
            h = _Holder(int(pid), host, int(since))
            f = rest.split("\n", 1)[0].split()
            if len(f) == 5 and f[0] == "progress":
                h.bytes, h.changed, h.alive, h.phase = int(f[1]), int(f[2]), int(f[3]), f[4]
            return h
        except (OSError, ValueError):
            return None

    def lock_holder(self) -> str:
        """'pid 123 on host since 2026-01-01T00:00:00Z', from the holder's line in the lock file."""
        h = self.read_holder()
        if h is None:
            return "another process"
        return f"pid {h.pid} on {h.host} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(h.since))}"

    def holder_stalled(self) -> tuple[_Holder, str] | None:
        """Has the holder of this node's lock stopped moving (and why)? Only a holder that reports its
        progress and is alive is judged (a dead one's line is stale: the kernel freed its lock): by its
        heartbeat (a stopped process, or one hung on the filesystem of the lock file, writes none) and by its
        progress (none while it works; not judged while it waits for the other nodes of its own staging)."""
        stall = self.o.lock_stall
        h = self.read_holder() if stall > 0 else None
        if h is None or not h.phase or (h.host == self.host and not _pid_alive(h.pid)):
            return None
        t = int(time.time())
        quiet, idle, done = t - h.alive, t - h.changed, _fmt_bytes(h.bytes)
        if quiet < stall and (h.phase == "peers" or idle < stall):
            return None
        if quiet >= SILENT_S:
            return h, (f"has shown no sign of life for {quiet} s (stopped, or hung on its filesystem; last progress "
                       f"{idle} s ago, {done} done)")
        return h, f"has made no progress for {idle} s (while in phase {h.phase}; {done} done)"

    def lock_report(self, waited: float, nwait: int) -> None:
        holder, h = self.lock_holder(), self.read_holder()
        prog = f"; its last progress {int(time.time()) - h.changed} s ago, {_fmt_bytes(h.bytes)} done" \
            if h is not None and h.phase else ""
        stall = f", or after {self.o.lock_stall} s without progress, --lock-stall" if self.o.lock_stall > 0 else ""
        if waited < 1:
            msg = (f"{self.dest} is being staged by {holder}; waiting for it to finish ({nwait} of {self.n} nodes "
                   f"wait; giving up after {self.o.lock_timeout} s, --lock-timeout{stall}{prog})")
        else:
            msg = (f"still waiting for {holder} to finish staging {self.dest} ({waited:.0f} of {self.o.lock_timeout}"
                   f" s; {nwait} of {self.n} nodes wait{prog})")
        print(f"aegis-stage: {self.host} (rank {self.wrank}): {msg}", file=sys.stderr, flush=True)

    def take_lock(self) -> None:
        """Take the lock of DEST on every node (flock: the kernel drops it when the process ends). A node
        whose lock another staging holds makes all wait: the others release theirs and all retry together,
        so two stagings sharing nodes never hold part each and wait for the rest. After --lock-timeout, or as
        soon as a node finds its holder stalled (--lock-stall), the nodes still without their lock fail,
        naming the holder; the others go on."""
        self.lock_file, folder, dest = self.lock_path()
        if not self.failed:
            try:
                _mkdirs(folder)
            except StageError as exc:
                self.fail(str(exc))
        if not self.failed:
            self.lock_open()
        t0, report_at = _now(), 0.0
        while True:
            got = self.failed or self.lock_try()
            stalled = None if got else self.holder_stalled()
            in_time = _now() - t0 < self.o.lock_timeout
            views = self.comm.allgather((got, in_time and not stalled))
            waiting = [r for r, (has, _) in enumerate(views) if not has]
            if not waiting:  # every node holds its lock
                break
            if not all(go_on for _, go_on in views):  # time is up, or a holder hangs: who holds a lock keeps it
                if not got:
                    self.lock_lost = True  # the file is the holder's
                    where = f"{self.dest} is being staged by {self.lock_holder()} (lock {self.lock_file})"
                    if stalled:
                        h, why = stalled
                        self.fail(f"{where}, which {why}; gave up after {_now() - t0:.0f} s (--lock-stall "
                                  f"{self.o.lock_stall}): if it hangs, end it (kill -KILL {h.pid} on {h.host}, or "
                                  "cancel its job) and run again")
                    elif not in_time:
                        self.fail(f"{where}; gave up after {self.o.lock_timeout} s: let that staging finish and run "
                                  "again, stop it, or raise --lock-timeout")
                    else:
                        self.fail(f"{where}; gave up after {_now() - t0:.0f} s with the other nodes of this staging, "
                                  "as another node's holder hangs (see its line)")
                break
            if got and not self.failed:
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            if waiting[0] == self.lrank and _now() - t0 >= report_at:
                self.lock_report(_now() - t0, len(waiting))
                report_at += LOCK_REPORT_S
            time.sleep(0.2 + random.random() * 0.3)
        if self.lock_fd >= 0 and not self.failed:
            line = f"{os.getpid()} {self.host} {int(time.time())} {dest}\n".encode()
            try:
                os.ftruncate(self.lock_fd, 0)
                os.pwrite(self.lock_fd, line, 0)
            except OSError as exc:
                print(f"aegis-stage: {self.host} (rank {self.wrank}): cannot write the lock file: {exc.strerror}",
                      file=sys.stderr, flush=True)
                return
            self.phase = "check"
            self.start_heartbeat(len(line))

    def start_heartbeat(self, at: int) -> None:
        """Rewrite the progress line (fixed width, at offset `at` of the lock file) every HEARTBEAT_S."""
        def beat() -> None:
            last: tuple[int, str] | None = None
            changed = 0
            while True:
                now = (self.progress, self.phase)
                t = int(time.time())
                if now != last:
                    last, changed = now, t
                line = f"progress {now[0]:20d} {changed:12d} {t:12d} {now[1][:8]:<8}\n".encode()
                try:
                    os.pwrite(self.lock_fd, line, at)
                except OSError:
                    pass  # a waiting staging sees the heartbeat stop
                if self.hb_stop.wait(HEARTBEAT_S):
                    return

        self.hb = threading.Thread(target=beat, daemon=True)
        self.hb.start()

    def lock_release(self) -> None:
        """Remove the lock file, then release the lock (the other order could let a newcomer lock a file
        that is about to go)."""
        if self.hb is not None:
            self.hb_stop.set()
            self.hb.join()
            self.hb = None
        if self.lock_fd < 0:
            return
        if not self.lock_lost:
            try:
                os.unlink(self.lock_file)
            except OSError:
                pass
        os.close(self.lock_fd)
        self.lock_fd = -1

    # ------------------------------------------------------------ I/O jobs
    def do_read(self, slot: _Slot) -> None:
        k, n = slot.k, self.tx_len(slot.k)
        mv, flags = slot.mv, 0
        t0 = _now()
        try:
            self.read_chunk(self.src, self.single, k, mv, self.tx)
        except OSError as exc:
            flags = 1
            msg = f"rank {self.wrank} on {self.host}: cannot read {exc.filename}: {exc.strerror}".encode()[:n]
            mv[:n] = bytes(n)
            mv[:len(msg)] = msg
        self.add("read", t0)
        t0 = _now()
        crc = zlib.crc32(mv[:n])
        self.add("checksum", t0)
        if k == self.corrupt_chunk and self.corrupt_rank in (-1, self.wrank) and n:
            mv[n // 2] ^= 0x5A  # test hook: damage the data after the checksum was taken
        mv[n:n + TRAILER] = k.to_bytes(8, "little") + crc.to_bytes(4, "little") + flags.to_bytes(4, "little")

    def do_write(self, slot: _Slot) -> None:
        k, n = slot.k, self.tx_len(slot.k)
        tr = bytes(slot.mv[n:n + TRAILER])
        got_k, crc, flags = int.from_bytes(tr[:8], "little"), int.from_bytes(tr[8:12], "little"), \
            int.from_bytes(tr[12:], "little")
        self.txcrc[k] = crc
        if got_k != k:
            self.fail(f"protocol error: expected chunk {k}, received {got_k}")
            return
        if self.skip or self.failed:
            return
        if flags & 1:
            msg = bytes(slot.mv[:min(n, 299)]).split(b"\0")[0].decode(errors="replace")
            self.fail(f"SRC could not be read ({msg})")
            return
        if not any(self.need[i] for i, _, _, _ in self.tx.pieces(k * self.C, k * self.C + n)):
            return
        if self.write_delay:
            time.sleep(self.write_delay)
        t0 = _now()
        ok = zlib.crc32(slot.mv[:n]) == crc
        self.add("checksum", t0)
        data = slot.mv
        if not ok:
            fix = bytearray(n)
            try:
                self.read_chunk(self.src, self.single, k, memoryview(fix), self.tx)
            except OSError as exc:
                self.fail(f"chunk {k} failed its checksum and could not be re-read from SRC: "
                          f"cannot read {exc.filename}: {exc.strerror}")
                return
            if zlib.crc32(fix) != crc:
                self.fail(f"chunk {k} failed its checksum and SRC now differs too (SRC changed while staging?)")
                return
            print(f"aegis-stage: {self.host} (rank {self.wrank}): chunk {k} failed its checksum; re-read from SRC",
                  file=sys.stderr, flush=True)
            with self.lock:
                self.repaired += 1
            data = memoryview(fix)
        t0 = _now()
        try:
            for i, off, ln, at in self.tx.pieces(k * self.C, k * self.C + n):
                self.write_piece(i, off, data[at:at + ln])
        except OSError as exc:
            self.fail(f"cannot write {exc.filename}: {exc.strerror}")
        self.add("write", t0)

    def write_piece(self, i: int, off: int, data: memoryview) -> None:
        if not self.need[i]:
            return  # already at DEST as SRC has it
        f = self.fs[i]
        e = self.m.entries[i]
        with f.lock:
            if f.fd < 0 and not f.done:
                tmp = self.tmp_name(i)
                try:
                    f.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                except OSError as exc:
                    raise OSError(exc.errno, exc.strerror, os.fsdecode(tmp)) from None
                try:
                    os.posix_fallocate(f.fd, 0, e.size)
                except OSError as exc:
                    if exc.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: the filesystem cannot preallocate
                        raise OSError(exc.errno, f"cannot allocate {e.size} bytes: {exc.strerror}",
                                      os.fsdecode(tmp)) from None
            fd = f.fd
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], off + done)
        with f.lock:
            f.written += len(data)
            if f.written == e.size and f.fd >= 0:
                os.close(f.fd)
                f.fd, f.done = -1, True

    # ------------------------------------------------------------ the ring
    def transfer(self) -> None:
        from mpi4py import MPI

        W, n = self.o.window, self.n
        left, right = (self.lrank - 1) % n, (self.lrank + 1) % n
        slots = [_Slot(self.C + TRAILER) for _ in range(W)]
        jobs: queue.SimpleQueue = queue.SimpleQueue()
        done: queue.SimpleQueue = queue.SimpleQueue()

        def worker():
            while True:
                job = jobs.get()
                if job is None:
                    return
                kind, i = job
                try:
                    (self.do_read if kind == READ else self.do_write)(slots[i])
                except Exception as exc:  # keep the ring turning; report the node as failed
                    self.fail(f"internal error in an I/O thread: {exc!r}")
                done.put(job)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.o.threads)]
        for t in threads:
            t.start()
        reqs = [MPI.REQUEST_NULL] * (2 * W)
        poll = float(os.environ.get("AEGIS_STAGE_POLL_US", "50")) * 1e-6
        t0 = _now()
        nxt = finished = 0
        while finished < self.KT:
            progress = False
            while nxt < self.KT:
                i = nxt % W
                s = slots[i]
                if s.k >= 0:
                    break
                s.k = nxt
                if nxt % n == self.lrank:
                    s.reading = True
                    jobs.put((READ, i))
                else:
                    s.receiving = True
                    reqs[i] = self.comm.Irecv([s.mv[:self.tx_len(nxt) + TRAILER], MPI.BYTE], left, nxt % 32768)
                nxt += 1
                progress = True
            idx = MPI.Request.Testsome(reqs)
            for j in idx or ():
                i = j % W
                s = slots[i]
                progress = True
                if j >= W:
                    s.sending = False
                    continue
                s.receiving = False
                if s.k % n != right:
                    s.sending = True
                    reqs[W + i] = self.comm.Isend([s.mv[:self.tx_len(s.k) + TRAILER], MPI.BYTE], right,
                                                  s.k % 32768)
                s.writing = True
                jobs.put((WRITE, i))
            completed = []
            try:
                completed.append(done.get_nowait() if progress else done.get(timeout=poll))
                while True:
                    completed.append(done.get_nowait())
            except queue.Empty:
                pass
            for kind, i in completed:
                s = slots[i]
                if kind == READ:
                    s.reading = False
                    if n > 1:
                        s.sending = True
                        reqs[W + i] = self.comm.Isend([s.mv[:self.tx_len(s.k) + TRAILER], MPI.BYTE], right,
                                                      s.k % 32768)
                    s.writing = True
                    jobs.put((WRITE, i))
                else:
                    s.writing = False
            for s in slots:
                if s.k >= 0 and not (s.reading or s.receiving or s.sending or s.writing):
                    self.progress += self.tx_len(s.k)
                    s.k = -1
                    finished += 1
        self.times["network"] = _now() - t0
        for _ in threads:
            jobs.put(None)
        for t in threads:
            t.join()

    # ------------------------------------------------------------ what goes over the ring
    def plan_send(self) -> None:
        """Which files go over the ring: those that at least one node writes (need, OR over the nodes); a
        file every node already holds as SRC has it is not sent."""
        from mpi4py import MPI

        n = len(self.m.entries)
        writes = not self.skip and not self.failed
        mine = bytearray(n + 1)
        if writes:
            mine[:n] = bytes(self.need)
            mine[n] = 1
        send = bytearray(n + 1)
        self.comm.Allreduce([mine, MPI.UNSIGNED_CHAR], [send, MPI.UNSIGNED_CHAR], op=MPI.MAX)
        pick = [bool(x) for x in send[:n]]
        self.writers = bool(send[n])
        self.files_sent = sum(1 for i, e in enumerate(self.m.entries) if e.type == "f" and pick[i])
        self.tx = self.m.substream(pick)
        self.KT = self.tx.chunks(self.C)
        self.txcrc = [0] * self.KT
        self.sent = True

    def last_crcs(self) -> None:
        """Which chunks' CRC-32 this node's last complete staging recorded (known, lastcrc): the marker's list
        covers the stream of the manifest it names (this one, or the record when that is the record's digest),
        and chunk k is the same bytes now when, with the same chunk size, it covers the same pieces of the same
        files (path, size, mtime: what "unchanged" means for a re-stage). Read before prepare() removes them."""
        self.known, self.lastcrc = bytearray(self.K), [0] * self.K
        mk = None if (self.failed or self.o.force or self.o.unpack) else mf.read_marker(self.marker)
        if mk is None or mk["chunk_size"] != self.C:
            return
        last = self.m if mk["manifest_sha256"] == self.digest else None
        if last is None and self.record:
            try:
                with open(self.record, "rb") as fh:
                    raw = fh.read()
                if hashlib.sha256(raw).hexdigest() == mk["manifest_sha256"]:
                    last = mf.Manifest.parse(raw)
            except (OSError, StageError, ValueError, IndexError):
                pass
        if last is None or len(mk["crcs"]) != -(-last.total // self.C):
            return
        def pieces(m: mf.Manifest, k: int) -> list[tuple[bytes, int, int, int, int, int]]:
            assert m.full is not None
            return [(m.entries[i].path, m.entries[i].size, m.entries[i].mtime_ns, off, n, at)
                    for i, off, n, at in m.full.pieces(k * self.C, k * self.C + m.full.chunk_len(self.C, k))]

        for k in range(min(self.K, len(mk["crcs"]))):
            if pieces(self.m, k) == pieces(last, k):
                self.known[k], self.lastcrc[k] = 1, mk["crcs"][k]

    def full_crcs(self) -> None:
        """The marker's CRC-32 of every chunk of the whole stream. When the ring carried all of it, these are
        the readers' CRCs. Otherwise (files every node had were not sent) a chunk's CRC comes from a last
        marker that holds it (any node's), else the leaders compute it from SRC, each its share (chunk k on
        leader k mod N): only CRCs travel."""
        from mpi4py import MPI

        assert self.m.full is not None
        if len(self.tx.files) == len(self.m.full.files):
            self.crc = list(self.txcrc)
            return
        if not self.writers:
            return
        known = bytearray(self.K)
        self.comm.Allreduce([self.known, MPI.UNSIGNED_CHAR], [known, MPI.UNSIGNED_CHAR], op=MPI.MAX)
        mine, vals = array.array("I", self.lastcrc), array.array("I", bytes(4 * self.K))
        self.comm.Allreduce([mine, MPI.UINT32_T], [vals, MPI.UINT32_T], op=MPI.MAX)
        todo = [not k for k in known]
        self.summed = sum(todo)
        part = [0] * self.K
        t0 = _now()
        bad = self.crc_pass(self.src, self.single, self.n, self.lrank, part, None, todo)
        self.add("read", t0)
        self.phase = "peers"
        self.crc = [c if todo[k] else vals[k] for k, c in enumerate(self.sum_crcs(part))]
        errors = self.comm.allgather(f"rank {self.wrank} on {self.host}: {bad[1]}" if bad else None)
        first = next((e for e in errors if e), None)
        if first and not self.skip:
            self.fail(f"SRC could not be read ({first})")

    def sum_crcs(self, part: list[int]) -> list[int]:
        """Every leader's share of the chunk CRCs (zeros elsewhere), summed over the leaders."""
        from mpi4py import MPI

        mine, total = array.array("I", part), array.array("I", bytes(4 * len(part)))
        self.comm.Allreduce([mine, MPI.UINT32_T], [total, MPI.UINT32_T], op=MPI.SUM)
        return list(total)

    # ------------------------------------------------------------ checksum passes
    def crc_pass(self, base: bytes, single: bool, stride: int, first: int, out: list[int] | None,
                 expect: list[int] | None, only: list[bool] | None = None) -> tuple[int, str] | None:
        """Checksum chunks first, first+stride, ... (those in only, when given); returns the first failing
        chunk and why, or None."""
        ks = [k for k in range(first, self.K, stride) if only is None or only[k]]
        errors: list[tuple[int, str]] = []

        def work(part):
            buf = memoryview(bytearray(self.C))
            for k in part:
                try:
                    self.read_chunk(base, single, k, buf)
                except OSError as exc:
                    errors.append((k, f"cannot read {exc.filename}: {exc.strerror}"))
                    return
                c = zlib.crc32(buf[:self.chunk_len(k)])
                with self.lock:
                    self.progress += self.chunk_len(k)
                if out is not None:
                    out[k] = c
                if expect is not None and expect[k] != c:
                    errors.append((k, f"chunk {k} differs from what was sent"))
                    return

        T = self.o.threads
        threads = [threading.Thread(target=work, args=(ks[t::T],)) for t in range(T)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return min(errors) if errors else None

    # ------------------------------------------------------------ finishing
    def finalize(self) -> None:
        for i, e in enumerate(self.m.entries):
            if self.failed:
                return
            if e.type == "d":
                continue
            tmp, fin = self.tmp_name(i), self.broot + b"/" + e.path
            if e.type == "f" and not self.need[i]:  # already in place; only its mode may have changed
                try:
                    os.chmod(fin, e.mode)
                except OSError as exc:
                    self.fail(f"cannot set the mode of {os.fsdecode(fin)}: {exc.strerror}")
                continue
            try:
                if e.type == "f":
                    if e.size == 0:
                        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
                    elif not self.fs[i].done:
                        self.fail(f"internal error: {os.fsdecode(e.path)} incomplete")
                        return
                    os.chmod(tmp, e.mode)
                    os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns))
                else:
                    try:
                        os.unlink(tmp)
                    except FileNotFoundError:
                        pass
                    os.symlink(e.target, tmp)
                os.rename(tmp, fin)
            except OSError as exc:
                self.fail(f"cannot finish {os.fsdecode(fin)}: {exc.strerror}")
                return
        for e in reversed(self.m.entries):
            if e.type == "d":
                os.chmod(self.broot + b"/" + e.path, e.mode | 0o700)

    def drop_chunk_files(self, k: int) -> None:
        """Remove the files of chunk k at DEST (it failed --verify), so that the next staging rewrites them."""
        for i, _, _, _ in self.m.pieces(k * self.C, k * self.C + self.chunk_len(k)):
            _remove(self.broot, self.m.entries[i].path)

    def cleanup(self) -> None:
        for i, e in enumerate(self.m.entries):
            if e.type == "d":
                continue
            if self.fs[i].fd >= 0:
                os.close(self.fs[i].fd)
                self.fs[i].fd = -1
            try:
                os.unlink(self.tmp_name(i))
            except OSError:
                pass

    def run_tar(self, tarball: str, folder: str) -> int:
        """tar -x; its reads and writes are this node's progress while it unpacks (can't tell: count it)."""
        proc = subprocess.Popen(["tar", "-x", "-f", tarball, "-C", folder], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        seen = 0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/io") as fh:
                    io = sum(int(ln.split()[1]) for ln in fh if ln.startswith(("rchar:", "wchar:")))
                self.progress += io - seen
                seen = io
            except (OSError, ValueError, IndexError):
                self.progress += 1
            time.sleep(0.1)
        return proc.returncode

    def unpack(self, marker: str) -> None:
        base = os.path.basename(self.dest)
        tarball = os.path.join(self.root, os.fsdecode(self.m.entries[0].path))
        fresh = os.path.join(self.root, f".aegis-unpack.{base}")
        old = os.path.join(self.root, f".aegis-old.{base}")
        for p in (fresh, old):
            shutil.rmtree(p, ignore_errors=True)
        try:
            os.mkdir(fresh, 0o755)
            code = self.run_tar(tarball, fresh)
            if code != 0:
                self.fail(f"tar -x -f {tarball} failed (status {code})")
            else:
                mf.write_marker(os.path.join(fresh, mf.MARKER), marker)
                if os.path.lexists(self.dest):
                    os.rename(self.dest, old)
                os.rename(fresh, self.dest)
        except OSError as exc:
            self.fail(f"cannot unpack into {self.dest}: {exc.strerror} ({exc.filename})")
        shutil.rmtree(old, ignore_errors=True)
        if self.failed:
            shutil.rmtree(fresh, ignore_errors=True)
        try:
            os.unlink(tarball)
        except OSError:
            pass


class _Holder:
    """What the holder of a lock wrote into the lock file (phase "" when it reports no progress)."""

    def __init__(self, pid: int, host: str, since: int):
        self.pid, self.host, self.since = pid, host, since
        self.bytes = self.changed = self.alive = 0
        self.phase = ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


class _Slot:
    """One chunk buffer and what is still pending on it."""

    def __init__(self, size: int):
        self.mv = memoryview(bytearray(size))
        self.k = -1
        self.reading = self.receiving = self.sending = self.writing = False


class _FileState:
    def __init__(self):
        self.fd, self.done, self.written = -1, False, 0
        self.lock = threading.Lock()


def private_dir_problem(path: str) -> str | None:
    """Create `path` 0700, or say why an existing one is not private (another owner, open to others, a link)."""
    try:
        os.makedirs(os.path.dirname(path.rstrip("/")) or "/", exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot create the private directory {path}: {exc.strerror}"
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory (a link or a file is in the way); remove it"
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return (f"{path} is not private (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}; this user is "
                f"uid {os.geteuid()} and needs 0700): another user may have put files there; remove it")
    return None


def _open_parent(root: bytes, rel: bytes) -> tuple[int, bytes] | None:
    """The directory holding root-relative `rel`, opened without following any link below root, and rel's
    last component; None when rel is not a plain relative path or a component is not a directory (a link,
    a file): nothing there is aegis's to touch."""
    parts = rel.split(b"/")
    if any(p in (b"", b".", b"..") or len(p) > 255 for p in parts):
        return None
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    for p in parts[:-1]:
        try:
            sub = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = sub
    return fd, parts[-1]


def _freeable(root: bytes, rel: bytes) -> int:
    """Bytes that removing the regular file at rel frees (0 for anything else, or a file with other links)."""
    where = _open_parent(root, rel)
    if where is None:
        return 0
    fd, last = where
    try:
        st = os.stat(last, dir_fd=fd, follow_symlinks=False)
        return st.st_blocks * 512 if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else 0
    except OSError:
        return 0
    finally:
        os.close(fd)


def _remove(root: bytes, rel: bytes) -> None:
    """Remove rel inside root: a file or a link itself, a directory only when empty; never follows a link."""
    where = _open_parent(root, rel)
    if where is None:
        return
    fd, last = where
    try:
        os.unlink(last, dir_fd=fd)
    except (IsADirectoryError, PermissionError):
        try:
            os.rmdir(last, dir_fd=fd)
        except OSError:
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def _gone(old: mf.Entry, new: mf.Manifest) -> bool:
    """An entry of the last staging that this one does not have (by path and type)."""
    e = new.by_path().get(old.path)
    return e is None or e.type != old.type


def _fmt_bytes(b: int) -> str:
    """'1.23 MB': units chosen so that the figures of one message stay distinguishable."""
    if b < 1000:
        return f"{b} B"
    v, unit = b / 1e3, 0
    while v >= 1000 and unit < 3:
        v /= 1e3
        unit += 1
    return f"{v:.2f} {('kB', 'MB', 'GB', 'TB')[unit]}"


def _mkdirs(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise StageError(f"cannot create directory {path}: a file is in the way") from None
    except NotADirectoryError as exc:
        raise StageError(f"cannot create directory {exc.filename}: a file is in the way") from None
    except OSError as exc:
        raise StageError(f"cannot create directory {exc.filename or path}: {exc.strerror}") from None


def _wait(req, sleep_s: float) -> None:
    while not req.Test():
        time.sleep(sleep_s)


def run(opts: StageOptions) -> int:
    """Stage under MPI with mpi4py; returns the exit status (the same on every rank)."""
    try:
        import mpi4py
    except ImportError:
        raise StageError("the mpi4py fallback of aegis stage needs mpi4py: pip install 'aegis-hpc[mpi]' "
                         "(or install the compiled tool: build aegis with mpicc and cmake on PATH)") from None

    mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI

    t_start = _now()
    world = MPI.COMM_WORLD
    wrank = world.Get_rank()
    host = socket.gethostname()
    if opts.per_rank:
        leader = True
    else:
        leader = world.Split_type(MPI.COMM_TYPE_SHARED, key=wrank).Get_rank() == 0
    leaders = world.Split(0 if leader else MPI.UNDEFINED, wrank)
    status = bytearray(4)
    if not leader:
        _wait(world.Ibcast(status, root=0), 0.002)
        return int.from_bytes(status, "little")
    code = _run_leader(opts, leaders, wrank, host, t_start)
    status[:] = code.to_bytes(4, "little")
    _wait(world.Ibcast(status, root=0), 0.0001)
    return int.from_bytes(status, "little")


def _run_leader(opts: StageOptions, comm, wrank: int, host: str, t_start: float) -> int:
    node = _Node(opts, comm, wrank, host)
    # 1. the manifest, walked once and broadcast
    payload: tuple[bool, bytes] | str | None = None
    if node.lrank == 0:
        try:
            single = os.path.isfile(opts.src)
            base = os.path.basename(opts.dest)
            if opts.unpack and not single:
                raise StageError(f"--unpack needs SRC to be a tar archive, {opts.src} is not a regular file")
            if opts.hf_repo and single:
                raise StageError(f"--hf-repo needs SRC to be a directory, {opts.src} is a file")
            if single and not base:
                raise StageError(f"DEST {opts.dest} must name the file to create")
            name = os.fsencode(f".aegis-tar.{base}" if opts.unpack else base) if single else None
            payload = (single, mf.walk(opts.src, name).serialize())
        except StageError as exc:
            payload = str(exc)
    payload = comm.bcast(payload, root=0)
    if isinstance(payload, str):
        if wrank == 0:
            print(f"aegis: error: {payload}", file=sys.stderr)
        return 1
    node.single, raw = payload
    node.m = mf.Manifest.parse(raw)
    node.digest = hashlib.sha256(raw).hexdigest()
    node.C = opts.chunk_size
    node.K = -(-node.m.total // node.C)
    node.crc = [0] * node.K
    node.fs = [_FileState() for _ in node.m.entries]
    node.need = [False] * len(node.m.entries)
    node.src = os.fsencode(opts.src)
    node.setup_paths()

    # 2. which nodes already hold exactly this content? (Only in a directory that is ours alone: a
    # marker and files planted by another user must never count.)
    if opts.private_dir:
        why = private_dir_problem(node.expand(opts.private_dir))
        if why:
            node.fail(why)
    node.take_lock()
    have = False
    mk = None if (opts.force or node.failed) else mf.read_marker(node.marker)
    if mk and mk["manifest_sha256"] == node.digest:
        if opts.unpack:
            have = os.path.isdir(node.dest) and mk["chunk_size"] == node.C
        else:
            have = mf.tree_matches(node.root, node.m)
        if have and opts.verify and not opts.unpack:
            saved = node.C, node.K
            node.C = mk["chunk_size"]
            node.K = -(-node.m.total // node.C)
            t0 = _now()
            bad = (0, "bad marker") if len(mk["crcs"]) != node.K else \
                node.crc_pass(node.vbase, node.single, 1, 0, None, mk["crcs"])
            node.times["verify"] += _now() - t0
            if bad:
                have = False
                node.resend_all = True  # sizes and mtimes cannot tell which file it is
                print(f"aegis-stage: {host} (rank {wrank}): the existing copy differs ({bad[1]}); re-sending",
                      file=sys.stderr, flush=True)
            node.C, node.K = saved
    if opts.unpack:
        from mpi4py import MPI

        node.phase = "peers"
        if comm.allreduce(int(have), op=MPI.MAX):
            part = [0] * node.K
            t0 = _now()
            node.phase = "checksum"
            bad = node.crc_pass(node.src, True, node.n, node.lrank, part, None)
            node.times["read"] += _now() - t0
            if bad:
                node.fail(bad[1])
            node.phase = "peers"
            node.crc = node.sum_crcs(part)
            node.key = mf.content_key(node.m.total, node.C, node.crc)
            have = have and mk is not None and mk["content_key"] == node.key
    node.skip = have
    node.phase = "peers"
    all_have = all(comm.allgather(have))

    if not all_have:
        # 3. prepare, transfer, finalize
        node.phase = "prepare"
        node.last_crcs()
        if not node.skip and not node.failed:
            node.prepare()
        node.phase = "peers"
        node.plan_send()
        node.phase = "transfer"
        node.transfer()
        node.phase = "checksum"
        node.full_crcs()
        node.phase = "finish"
        node.key = mf.content_key(node.m.total, node.C, node.crc)
        marker = mf.marker_text(node.digest, node.key, node.m, node.C, node.crc)
        if not node.skip and not node.failed:
            t0 = _now()
            node.finalize()
            node.add("write", t0)
        if not node.skip and not node.failed and opts.verify:
            t0 = _now()
            node.phase = "verify"
            bad = node.crc_pass(node.vbase, node.single, 1, 0, None, node.crc)
            if bad:
                node.fail(f"verify: {bad[1]}; its files were removed: run again to rewrite them")
                node.drop_chunk_files(bad[0])
            node.times["verify"] += _now() - t0
        if not node.skip and not node.failed:
            if opts.unpack:
                t0 = _now()
                node.phase = "unpack"
                node.unpack(marker)
                node.add("write", t0)
            else:
                try:
                    mf.write_marker(node.marker, marker)
                    if node.hf_model:
                        refs = os.path.join(node.hf_model, "refs")
                        os.makedirs(refs, exist_ok=True)
                        with open(os.path.join(refs, "main"), "w") as fh:
                            fh.write(node.hf_rev)
                except OSError as exc:
                    node.fail(f"cannot write {exc.filename}: {exc.strerror}")
        if node.prepared and node.failed:
            node.cleanup()

    # 4. one summary, one exit status
    node.phase = "peers"
    code = _report(node, opts, t_start)
    node.lock_release()
    return code


def _report(node: _Node, opts: StageOptions, t_start: float) -> int:
    total = _now() - t_start
    mine = dict(failed=node.failed, skipped=node.skip, repaired=node.repaired, times=dict(node.times, total=total),
                host=node.host, rank=node.wrank, reason=node.reason)
    everyone = node.comm.gather(mine, root=0)
    if node.lrank != 0:
        return 0
    nfail = sum(r["failed"] for r in everyone)
    nskip = sum(r["skipped"] for r in everyone)
    rep = sum(r["repaired"] for r in everyone)
    mx = {p: max(r["times"][p] for r in everyone) for p in everyone[0]["times"]}
    secs = mx["total"] or 1e-9
    sent = node.tx.total if node.sent else 0
    moved = sent
    nodes = node.n
    if opts.json:
        print(json.dumps({
            "impl": "mpi4py", "src": opts.src, "dest": opts.dest, "bytes": node.m.total, "files": node.m.nfiles,
            "bytes_sent": sent, "bytes_skipped": node.m.total - sent, "files_sent": node.files_sent,
            "chunks_sent": node.KT if node.sent else 0, "chunks_summed": node.summed,
            "nodes": nodes, "ranks": _world_size(), "seconds": round(secs, 6),
            "gbps_per_node": round(moved / secs / 1e9, 6), "skipped_nodes": nskip, "failed_nodes": nfail,
            "repaired_chunks": rep, "chunk_size": node.C, "window": opts.window, "threads": opts.threads,
            "chunks": node.K, "manifest_sha256": node.digest,
            "phases": {p: round(mx[p], 6) for p in ("read", "network", "write", "checksum", "verify")},
            "failures": [{"host": r["host"], "rank": r["rank"], "reason": r["reason"]} for r in everyone
                         if r["failed"]],
        }), flush=True)
    else:
        size = f"{node.m.total / 1e9:.2f} GB"
        if nskip == nodes:
            print(f"aegis stage: {size} in {node.m.nfiles} files already staged on all {nodes} nodes at "
                  f"{opts.dest} ({secs:.2f} s) [mpi4py]", flush=True)
        else:
            part = (f"; sent {_fmt_bytes(sent)} ({node.files_sent} of {node.m.nfiles} files; the others were on "
                    "every node already)") if node.writers and node.files_sent < node.m.nfiles else ""
            print(f"aegis stage: {size} in {node.m.nfiles} files to {nodes} nodes in {secs:.2f} s "
                  f"({moved / secs / 1e9:.2f} GB/s per node){part}; read {mx['read']:.2f} s, "
                  f"network {mx['network']:.2f} s, write {mx['write']:.2f} s, checksum {mx['checksum']:.2f} s, "
                  f"verify {mx['verify']:.2f} s; "
                  f"{nskip} skipped, {nfail} failed, {rep} chunks repaired [mpi4py]", flush=True)
        if opts.hf_repo and nfail < nodes:
            print(f"aegis stage: set HF_HUB_CACHE={opts.dest} and HF_HUB_OFFLINE=1, then serve the model as "
                  f"{opts.hf_repo}", flush=True)
    failures = [r for r in everyone if r["failed"]]
    for r in failures[:MAX_FAIL_LINES]:
        print(f"aegis: error: {r['host']} (rank {r['rank']}): {r['reason']}", file=sys.stderr)
    if len(failures) > MAX_FAIL_LINES:
        print(f"aegis: error: ... and {len(failures) - MAX_FAIL_LINES} more nodes failed", file=sys.stderr)
    if nfail:
        rest = "the other nodes hold a complete copy" if nfail < nodes else "no node holds a complete copy"
        print(f"aegis: error: staging failed on {nfail} of {nodes} nodes (listed above); {rest}",
              file=sys.stderr, flush=True)
    return 1 if nfail else 0


def _world_size() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()
