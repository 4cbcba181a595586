"""Issue 17, staging: concurrent stagings into one DEST, a stopped or dead lock holder, mirror semantics,
in-place updates in little room, re-stages that send only what some node lacks.

Real mpirun with 2-3 oversubscribed ranks, each its own "node" (--per-rank), compiled tool and mpi4py."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from aegis.staging import stage
from tests.stage.conftest import (
    finish,
    leftovers,
    mpi_env,
    mpirun_prefix,
    ok,
    run_stage,
    start_stage,
    summary,
    tree_digest,
)

CHUNK = ["--chunk-size", "64K", "--window", "4", "--threads", "2"]


def _other(impl: str) -> str:
    return "mpi4py" if impl == "native" else "native"


def _wait_for(what: str, predicate, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def _holder_pid(private: Path) -> int:
    """The pid the lock file in private names (the staging that holds it)."""
    for _ in range(200):
        locks = list(private.glob(".aegis-lock.*"))
        text = locks[0].read_text() if locks else ""
        if text:
            return int(text.split()[0])
        time.sleep(0.05)
    raise AssertionError(f"no lock file with a holder in {private}")


@pytest.mark.slow
def test_concurrent_stagings_into_one_dest_take_turns(impl, model, tmp_path):
    """A chain's successor lands on nodes where its predecessor is still staging the same model: it waits
    for the lock and then finds DEST complete; one with a short --lock-timeout fails naming the holder.
    The waiting one is the other implementation: the lock is the same file for both."""
    private = tmp_path / "node{rank}" / "aegis-me"
    dest = private / "models" / "m"
    args = ["--private-dir", str(private), *CHUNK]
    first = start_stage(impl, 2, model, dest, *args, env={"AEGIS_STAGE_TEST_WRITE_DELAY_MS": "250"})
    node0 = tmp_path / "node0" / "aegis-me"
    try:
        _wait_for("the first staging to write", lambda: leftovers(node0 / "models" / "m"))
        pid = _holder_pid(node0)
        impatient = start_stage(impl, 2, model, dest, *args, "--lock-timeout", "1")
        patient = start_stage(_other(impl), 2, model, dest, *args)
        impatient, patient = finish(impatient), finish(patient)
        first_done = finish(first)
    finally:
        if first.poll() is None:
            first.kill()
    assert ok(first_done)["skipped_nodes"] == 0
    holder = f"is being staged by pid {pid} on {socket.gethostname()} since "
    assert ok(patient)["skipped_nodes"] == 2, patient.stderr  # it waited, then found DEST complete
    assert holder in patient.stderr and "waiting for it to finish" in patient.stderr
    assert impatient.returncode == 1 and summary(impatient)["failed_nodes"] == 2
    assert holder in impatient.stderr and "gave up after 1 s" in impatient.stderr
    assert "raise --lock-timeout" in impatient.stderr and "Traceback" not in impatient.stderr
    for r in range(2):
        private_r = tmp_path / f"node{r}" / "aegis-me"
        assert tree_digest(private_r / "models" / "m") == tree_digest(model)
        assert (private_r / "models" / "m" / ".aegis-stage.json").is_file()
        assert not leftovers(private_r) and not list(private_r.glob(".aegis-lock.*"))
    assert ok(run_stage(impl, 2, model, dest, "--verify", *args))["skipped_nodes"] == 2


@pytest.mark.slow
def test_restaging_a_changed_source_mirrors_it(impl, model, tmp_path):
    """Files removed from or renamed in SRC leave DEST; files aegis did not write stay, and a link planted
    where aegis's directory was is removed itself, never followed."""
    (model / "gone").mkdir()
    (model / "gone" / "old.bin").write_bytes(b"o" * 5000)
    dest = tmp_path / "node{rank}"
    ok(run_stage(impl, 2, model, dest, *CHUNK))
    (tmp_path / "node0" / "notes.txt").write_text("the user's own")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "old.bin").write_text("not aegis's")
    shutil.rmtree(tmp_path / "node1" / "gone")
    os.symlink(outside, tmp_path / "node1" / "gone")
    kept = {r: (tmp_path / f"node{r}" / "model-00001.safetensors").stat().st_ino for r in range(2)}

    shutil.rmtree(model / "gone")
    (model / "model-00002.safetensors").unlink()
    os.rename(model / "config.json", model / "config-renamed.json")
    (model / "added.bin").write_bytes(os.urandom(200_000))
    s = ok(run_stage(impl, 2, model, dest, *CHUNK))
    assert s["skipped_nodes"] == 0

    want = tree_digest(model)
    got0 = tree_digest(tmp_path / "node0")
    assert got0.pop("notes.txt") and got0 == want
    assert tree_digest(tmp_path / "node1") == want and not (tmp_path / "node1" / "gone").exists()
    assert (outside / "old.bin").read_text() == "not aegis's"
    for r in range(2):
        assert (tmp_path / f"node{r}" / "model-00001.safetensors").stat().st_ino == kept[r]  # not rewritten
        assert not leftovers(tmp_path / f"node{r}")
    assert ok(run_stage(_other(impl), 2, model, dest, "--verify", *CHUNK))["skipped_nodes"] == 2


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 12 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    fs = tmp_path / "tmpfs"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(fs)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield fs
    subprocess.run(["umount", "-l", str(fs)])


@pytest.mark.slow
def test_restaging_needs_room_for_the_changed_files_only(impl, tmp_path, small_tmpfs):
    """Two copies of a 4.5 MB model on a 12 MiB tmpfs leave less room than a third copy: a re-stage with one
    changed file rewrites that file in place; one that needs more room than there is fails before it
    changes anything, saying how much is missing."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"w{i}.bin").write_bytes(os.urandom(1_500_000))
    (src / "config.json").write_text('{"v": 1}')
    dest = small_tmpfs / "node{rank}"
    ok(run_stage(impl, 2, src, dest, *CHUNK))
    assert shutil.disk_usage(small_tmpfs).free < 4_500_000  # a whole second copy would not fit
    inodes = {r: (small_tmpfs / f"node{r}" / "w0.bin").stat().st_ino for r in range(2)}

    (src / "w1.bin").write_bytes(os.urandom(1_500_000))
    s = ok(run_stage(impl, 2, src, dest, *CHUNK))
    assert s["skipped_nodes"] == 0
    for r in range(2):
        assert tree_digest(small_tmpfs / f"node{r}") == tree_digest(src)
        assert (small_tmpfs / f"node{r}" / "w0.bin").stat().st_ino == inodes[r]  # unchanged: not rewritten
        assert not leftovers(small_tmpfs / f"node{r}")

    before = tree_digest(small_tmpfs / "node0")
    (src / "w3.bin").write_bytes(os.urandom(4_000_000))
    proc = run_stage(_other(impl), 2, src, dest, *CHUNK)
    assert proc.returncode == 1 and summary(proc)["failed_nodes"] == 2 and "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "(rank 0): not enough space" in ln)
    assert f"not enough space in {small_tmpfs}/node0: writing 1 of 5 files needs 4.00 MB, " in line
    assert "(short by " in line and "stage to another DEST" in line
    for r in range(2):  # the last complete copy is untouched and still marked complete
        assert tree_digest(small_tmpfs / f"node{r}") == before
        assert (small_tmpfs / f"node{r}" / ".aegis-stage.json").is_file()
        assert not leftovers(small_tmpfs / f"node{r}")


@pytest.mark.slow
def test_the_launcher_api_shows_the_wait(model, tmp_path, capfd):
    """aegis launch stages through stage(), which captures the output: the waiting message still reaches
    the user as it comes. Without --private-dir the lock file is beside DEST."""
    dest = tmp_path / "d"
    first = start_stage("native", 1, model, dest, *CHUNK, env={"AEGIS_STAGE_TEST_WRITE_DELAY_MS": "250"})
    try:
        _wait_for("the first staging to write", lambda: leftovers(dest))
        pid = _holder_pid(tmp_path)
        s = stage(str(model), str(dest), mpirun_prefix(1), env=mpi_env(), per_rank=True, chunk_size=64 << 10)
        assert ok(finish(first))["skipped_nodes"] == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert s["skipped_nodes"] == 1
    assert f"{dest} is being staged by pid {pid} on " in capfd.readouterr().err
    assert tree_digest(dest) == tree_digest(model) and not list(tmp_path.glob(".aegis-lock.*"))


@pytest.mark.slow
def test_a_kept_file_that_fails_verify_is_rewritten_next_time(impl, model, tmp_path):
    """A re-stage keeps files with SRC's size and mtime; --verify re-reads them too. One damaged in place
    (size and mtime kept) fails the node and is removed, so the next run rewrites it."""
    dest = tmp_path / "node{rank}"
    ok(run_stage(impl, 2, model, dest, *CHUNK))
    victim = tmp_path / "node1" / "model-00001.safetensors"
    st = victim.stat()
    with open(victim, "r+b") as fh:
        fh.seek(70_000)
        fh.write(b"\0damage\0")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    (model / "config.json").write_text('{"hidden_size": 512}')
    proc = run_stage(impl, 2, model, dest, "--verify", *CHUNK)
    assert proc.returncode == 1 and summary(proc)["failed_nodes"] == 1
    assert "(rank 1): verify: chunk 1 differs" in proc.stderr and "run again to rewrite them" in proc.stderr
    assert not victim.exists() and not (tmp_path / "node1" / ".aegis-stage.json").exists()
    ok(run_stage(_other(impl), 2, model, dest, "--verify", *CHUNK))
    for r in range(2):
        assert tree_digest(tmp_path / f"node{r}") == tree_digest(model)


def _progress(private: Path) -> int:
    """Bytes done by the staging that holds the lock in private, from its lock file's progress line (-1: none)."""
    locks = list(private.glob(".aegis-lock.*"))
    lines = locks[0].read_text().splitlines() if locks else []
    return int(lines[1].split()[1]) if len(lines) > 1 and lines[1].startswith("progress ") else -1


@pytest.mark.slow
def test_a_stopped_lock_holder_is_named_and_a_killed_one_never_blocks(impl, model, tmp_path):
    """A staging holding the lock of DEST is stopped (SIGSTOP) on one node; its other node, alive, can make no
    progress without it. The next staging fails within --lock-stall, not --lock-timeout, naming each holder (pid,
    host), how long it has been silent or idle, and how to clear it; once that pid is killed as the line says,
    the kernel has dropped its locks: a staging that will not wait at all (--lock-timeout 0) completes DEST."""
    private = tmp_path / "node{rank}" / "aegis-me"
    dest = private / "models" / "m"
    args = ["--private-dir", str(private), *CHUNK]
    host = socket.gethostname()
    first = start_stage(impl, 2, model, dest, *args, env={"AEGIS_STAGE_TEST_WRITE_DELAY_MS": "1000"})
    node0, node1 = tmp_path / "node0" / "aegis-me", tmp_path / "node1" / "aegis-me"
    pid0 = pid1 = 0
    try:
        _wait_for("the first staging to write", lambda: leftovers(node0 / "models" / "m"))
        _wait_for("progress in the lock files", lambda: all(_progress(p) > 0 for p in (node0, node1)))
        pid0, pid1 = _holder_pid(node0), _holder_pid(node1)
        os.kill(pid0, signal.SIGSTOP)
        t0 = time.monotonic()
        stopped = run_stage(_other(impl), 2, model, dest, *args, "--lock-stall", "5", "--lock-timeout", "600")
        waited = time.monotonic() - t0
        # node1 alone: its holder is alive (its heartbeat goes on) but its ring is stuck at the stopped node
        lone = str(node1 / "models" / "m")
        idle = run_stage(impl, 1, model, lone, "--private-dir", str(node1), *CHUNK, "--lock-stall", "5",
                         "--lock-timeout", "600")
        os.kill(pid0, signal.SIGKILL)  # what the line says to do
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            if pid0:
                os.kill(pid0, signal.SIGKILL)
            first.kill()
            first.communicate()
    assert stopped.returncode == 1 and summary(stopped)["failed_nodes"] == 2 and "Traceback" not in stopped.stderr
    assert waited < 60, waited  # --lock-stall 5, far below --lock-timeout 600 (mpirun start-up included)
    line = next(ln for ln in stopped.stderr.splitlines() if ln.startswith(f"aegis: error: {host} (rank 0): "))
    assert f"is being staged by pid {pid0} on {host} since " in line
    assert re.search(r"which has shown no sign of life for \d+ s \(stopped, or hung on its filesystem; last "
                     r"progress \d+ s ago, [0-9.]+ [kM]B done\)", line), line
    assert f"(--lock-stall 5): if it hangs, end it (kill -KILL {pid0} on {host}, or cancel its job)" in line
    assert "waiting for it to finish" in stopped.stderr and "or after 5 s without progress, --lock-stall" in \
        stopped.stderr
    assert idle.returncode == 1 and "Traceback" not in idle.stderr
    line = next(ln for ln in idle.stderr.splitlines() if ln.startswith("aegis: error: ") and "(rank 0)" in ln)
    assert f"is being staged by pid {pid1} on {host} since " in line
    assert re.search(r"which has made no progress for \d+ s \(while in phase transfer; ", line), line
    assert f"kill -KILL {pid1} on {host}" in line

    again = run_stage(_other(impl), 2, model, dest, *args, "--lock-timeout", "0")
    assert ok(again)["skipped_nodes"] == 0 and "being staged by" not in again.stderr
    for r in range(2):
        private_r = tmp_path / f"node{r}" / "aegis-me"
        assert tree_digest(private_r / "models" / "m") == tree_digest(model)
        assert not leftovers(private_r) and not list(private_r.glob(".aegis-lock.*"))


@pytest.mark.slow
def test_a_restage_sends_only_what_some_node_lacks(impl, model, tmp_path, sent_bytes):
    """A changed file is the only one to go over the ring; a file one node lost goes again while the others
    skip. The bytes sent are counted by the tool's summary and, independently, by an MPI_Isend wrapper in every
    rank: each chunk of what is sent, with its 16-byte trailer, crosses N-1 links of the ring. The marker's
    chunk CRCs are taken from the last marker where the chunk holds the same bytes, else summed from SRC."""
    n = 3
    dest = tmp_path / "node{rank}"

    def ring(s: dict) -> int:
        return (s["bytes_sent"] + 16 * s["chunks_sent"]) * (n - 1)

    s = ok(run_stage(impl, n, model, dest, *CHUNK, env=sent_bytes.env()))
    assert (s["bytes_sent"], s["bytes_skipped"], s["files_sent"]) == (s["bytes"], 0, s["files"])
    assert s["chunks_sent"] == s["chunks"] and sent_bytes.total() == ring(s)
    kept = {r: (tmp_path / f"node{r}" / "model-00001.safetensors").stat().st_ino for r in range(n)}

    changed = model / "model-00002.safetensors"
    changed.write_bytes(os.urandom(705_001))  # new content and size: what follows it moves in the stream
    size = changed.stat().st_size
    starts = (model / "config.json").stat().st_size + (model / "model-00001.safetensors").stat().st_size
    s = ok(run_stage(impl, n, model, dest, *CHUNK, env=sent_bytes.env()))
    assert s["skipped_nodes"] == 0 and (s["files_sent"], s["bytes_sent"], s["chunks_sent"]) == (1, size, 11)
    assert s["chunks_summed"] == s["chunks"] - starts // 65536  # from the changed file's first chunk on
    assert s["bytes_skipped"] == s["bytes"] - size and sent_bytes.total() == ring(s) == (size + 16 * 11) * 2
    for r in range(n):
        assert tree_digest(tmp_path / f"node{r}") == tree_digest(model)
        assert (tmp_path / f"node{r}" / "model-00001.safetensors").stat().st_ino == kept[r]
        assert not leftovers(tmp_path / f"node{r}")

    lost = model / "model-00001.safetensors"
    (tmp_path / "node1" / lost.name).unlink()
    s = ok(run_stage(_other(impl), n, model, dest, *CHUNK, env=sent_bytes.env()))
    assert s["skipped_nodes"] == 2 and (s["files_sent"], s["bytes_sent"]) == (1, lost.stat().st_size)
    assert sent_bytes.total() == ring(s) and s["chunks_summed"] == 0  # every chunk's CRC is in the last marker
    for r in range(n):
        assert tree_digest(tmp_path / f"node{r}") == tree_digest(model)
    for r in (0, 2):
        assert (tmp_path / f"node{r}" / lost.name).stat().st_ino == kept[r]

    # The markers' chunk CRCs cover what was not sent too: the same bytes as a first staging writes, and
    # --verify re-reads every copy against them.
    ok(run_stage(impl, 1, model, tmp_path / "fresh", *CHUNK))
    fresh = (tmp_path / "fresh" / ".aegis-stage.json").read_bytes()
    assert all((tmp_path / f"node{r}" / ".aegis-stage.json").read_bytes() == fresh for r in range(n))
    assert ok(run_stage(impl, n, model, dest, "--verify", *CHUNK))["skipped_nodes"] == n
