"""`aegis stage` under a real mpirun with 2-4 oversubscribed ranks, compiled tool and mpi4py."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tarfile
import tempfile

import pytest

from aegis.errors import StageError
from aegis.staging import stage
from tests.stage.conftest import leftovers, mpi_env, mpirun_prefix, ok, run_stage, summary, tree_digest

CHUNK = ["--chunk-size", "64K", "--window", "4", "--threads", "2"]


@pytest.mark.slow
def test_identical_copies_skip_and_force(impl, model, tmp_path):
    dest = tmp_path / "node{rank}" / "model"
    s = ok(run_stage(impl, 3, model, dest, *CHUNK))
    assert (s["impl"], s["nodes"], s["failed_nodes"], s["skipped_nodes"]) == (impl, 3, 0, 0)
    assert s["chunks"] > 40  # several chunks per file, several in flight
    want = tree_digest(model)
    for r in range(3):
        got = tmp_path / f"node{r}" / "model"
        assert tree_digest(got) == want
        assert os.readlink(got / "tokenizer.json") == "sub/tokenizer.json"
        assert not (got / "outside-link").is_symlink()
        assert (got / "outside-link").read_text() == "lives outside SRC"
        assert (got / "config.json").stat().st_mode & 0o777 == 0o640
        assert (got / "config.json").stat().st_mtime_ns == (model / "config.json").stat().st_mtime_ns
        assert not leftovers(got)
    again = ok(run_stage(impl, 3, model, dest, *CHUNK))
    assert again["skipped_nodes"] == 3 and again["phases"]["network"] == 0
    forced = ok(run_stage(impl, 3, model, dest, "--force", *CHUNK))
    assert forced["skipped_nodes"] == 0
    assert tree_digest(tmp_path / "node2" / "model") == want


@pytest.mark.slow
def test_changed_source_is_resent_never_skipped_on_size(impl, model, tmp_path):
    dest = tmp_path / "node{rank}"
    ok(run_stage(impl, 2, model, dest, *CHUNK))
    f = model / "config.json"
    f.write_text('{"hidden_size": 512}')  # same size, new content and mtime
    s = ok(run_stage(impl, 2, model, dest, *CHUNK))
    assert s["skipped_nodes"] == 0
    assert (tmp_path / "node1" / "config.json").read_text() == '{"hidden_size": 512}'


@pytest.mark.slow
def test_verify_rereads_destination(impl, model, tmp_path):
    dest = tmp_path / "node{rank}"
    ok(run_stage(impl, 2, model, dest, "--verify", *CHUNK))
    victim = tmp_path / "node1" / "model-00001.safetensors"
    st = victim.stat()
    with open(victim, "r+b") as fh:  # damage in place, keep size and mtime
        fh.seek(100_000)
        fh.write(b"\0garbage\0")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ok(run_stage(impl, 2, model, dest, *CHUNK))["skipped_nodes"] == 2  # metadata alone looks fine
    proc = run_stage(impl, 2, model, dest, "--verify", *CHUNK)
    s = ok(proc)
    assert s["skipped_nodes"] == 1 and "existing copy differs" in proc.stderr
    assert victim.read_bytes() == (model / "model-00001.safetensors").read_bytes()


@pytest.mark.slow
def test_corrupted_chunk_detected_and_repaired(impl, model, tmp_path):
    dest = tmp_path / "node{rank}"
    proc = run_stage(impl, 3, model, dest, *CHUNK, env={"AEGIS_STAGE_TEST_CORRUPT": "5"})
    s = ok(proc)
    assert s["repaired_chunks"] == 3  # every node saw the damaged chunk and re-read it from SRC
    assert proc.stderr.count("chunk 5 failed its checksum") == 3
    for r in range(3):
        assert tree_digest(tmp_path / f"node{r}") == tree_digest(model)


@pytest.mark.slow
def test_unwritable_destination_reported_with_host(impl, model, tmp_path):
    (tmp_path / "node1").write_text("a file where rank 1 needs a directory")
    dest = tmp_path / "node{rank}" / "model"
    proc = run_stage(impl, 3, model, dest, *CHUNK)
    assert proc.returncode != 0
    s = summary(proc)
    assert s["failed_nodes"] == 1
    assert s["failures"][0]["rank"] == 1 and s["failures"][0]["host"] == socket.gethostname()
    assert f"aegis: error: {socket.gethostname()} (rank 1): cannot create directory" in proc.stderr
    assert "staging failed on 1 of 3 nodes" in proc.stderr and "Traceback" not in proc.stderr
    for r in (0, 2):
        assert tree_digest(tmp_path / f"node{r}" / "model") == tree_digest(model)


@pytest.mark.slow
def test_failure_midway_leaves_no_half_written_files(impl, model, tmp_path):
    """A node that cannot rename a finished file into place fails; no temporary or half-written file stays."""
    (tmp_path / "node1").mkdir()
    # a directory named like a file of the model: writing its temporary file works, the rename fails
    (tmp_path / "node1" / "config.json").mkdir()
    (tmp_path / "node1" / "config.json" / "keep").write_text("x")
    proc = run_stage(impl, 2, model, tmp_path / "node{rank}", *CHUNK)
    assert proc.returncode == 1
    assert "(rank 1): cannot " in proc.stderr
    assert not leftovers(tmp_path / "node1")
    assert not (tmp_path / "node1" / ".aegis-stage.json").exists()
    for p in (tmp_path / "node1").rglob("*"):
        if p.is_file() and p.name != "keep" and not p.name.startswith(".aegis-stage."):  # not aegis' record
            assert p.read_bytes() == (model / p.relative_to(tmp_path / "node1")).read_bytes()
    assert tree_digest(tmp_path / "node0") == tree_digest(model)


@pytest.mark.slow
def test_empty_directory(impl, tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    s = ok(run_stage(impl, 2, src, tmp_path / "node{rank}" / "x"))
    assert (s["bytes"], s["files"], s["chunks"]) == (0, 0, 0)
    for r in range(2):
        assert (tmp_path / f"node{r}" / "x" / ".aegis-stage.json").is_file()
    assert ok(run_stage(impl, 2, src, tmp_path / "node{rank}" / "x"))["skipped_nodes"] == 2


@pytest.mark.slow
def test_dangling_symlink_is_one_line_error(impl, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("/nonexistent/target", src / "broken")
    proc = run_stage(impl, 2, src, tmp_path / "d{rank}")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == f"aegis: error: symlink {src}/broken -> /nonexistent/target is dangling"


@pytest.mark.slow
def test_single_file_and_unpack_keyed_by_content(impl, model, tmp_path):
    tar = tmp_path / "env.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(model / "config.json", arcname="etc/config.json")
        tf.add(model / "model-00001.safetensors", arcname="lib/blob")
    ok(run_stage(impl, 2, tar, tmp_path / "n{rank}" / "files" / "env.tar", *CHUNK))
    for r in range(2):
        assert (tmp_path / f"n{r}" / "files" / "env.tar").read_bytes() == tar.read_bytes()
    dest = tmp_path / "n{rank}" / "env"
    ok(run_stage(impl, 2, tar, dest, "--unpack", *CHUNK))
    assert (tmp_path / "n1" / "env" / "etc" / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert ok(run_stage(impl, 2, tar, dest, "--unpack", *CHUNK))["skipped_nodes"] == 2
    # a rebuilt tarball with the same name, size and mtime but other content must not reuse the old copy
    st = tar.stat()
    data = bytearray(tar.read_bytes())
    pos = data.index(b'{"hidden_size": 256}')
    data[pos:pos + 20] = b'{"hidden_size": 999}'
    tar.write_bytes(bytes(data))
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    s = ok(run_stage(impl, 2, tar, dest, "--unpack", *CHUNK))
    assert s["skipped_nodes"] == 0
    assert (tmp_path / "n0" / "env" / "etc" / "config.json").read_text() == '{"hidden_size": 999}'
    assert not [p for p in (tmp_path / "n0").iterdir() if p.name.startswith(".aegis")]


@pytest.mark.slow
def test_hf_cache_layout(impl, model, tmp_path):
    proc = run_stage(impl, 2, model, tmp_path / "n{rank}" / "hub", "--hf-repo", "org/tiny",
                     "--hf-revision", "main-rev")
    ok(proc)
    base = tmp_path / "n1" / "hub" / "models--org--tiny"
    assert (base / "refs" / "main").read_text() == "main-rev"
    assert tree_digest(base / "snapshots" / "main-rev") == tree_digest(model)


@pytest.mark.slow
def test_two_ranks_on_one_node_write_once(impl, model, tmp_path):
    s = ok(run_stage(impl, 2, model, tmp_path / "d{rank}", per_rank=False))
    assert (s["nodes"], s["ranks"]) == (1, 2)
    assert tree_digest(tmp_path / "d0") == tree_digest(model) and not (tmp_path / "d1").exists()


@pytest.mark.slow
def test_other_implementation_recognises_the_marker(impl, model, tmp_path):
    other = "mpi4py" if impl == "native" else "native"
    ok(run_stage(impl, 2, model, tmp_path / "d{rank}", *CHUNK))
    assert ok(run_stage(other, 2, model, tmp_path / "d{rank}", "--verify", *CHUNK))["skipped_nodes"] == 2


@pytest.mark.slow
def test_file_larger_than_2gib(impl, tmp_path):
    """Chunk offsets past 2**31 (signed 32-bit): a sparse 2.06 GiB file, staged to tmpfs, regions compared."""
    big = tmp_path / "big.bin"
    size = (1 << 31) + (64 << 20) + 12345
    marks = {0: os.urandom(4096), (1 << 31) - 2048: os.urandom(4096), size - 4096: os.urandom(4096)}
    with open(big, "wb") as fh:
        fh.truncate(size)
        for off, data in marks.items():
            fh.seek(off)
            fh.write(data)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else str(tmp_path)
    out_root = tempfile.mkdtemp(prefix="aegis-stage-test-", dir=shm)
    try:
        s = ok(run_stage(impl, 2, big, os.path.join(out_root, "n{rank}", "big.bin"), "--verify",
                         timeout=300))
        assert s["bytes"] == size and s["chunks"] == 133
        for r in range(2):
            out = os.path.join(out_root, f"n{r}", "big.bin")
            assert os.stat(out).st_size == size
            with open(out, "rb") as fh:
                for off, data in marks.items():
                    fh.seek(off)
                    assert fh.read(4096) == data
    finally:
        shutil.rmtree(out_root, ignore_errors=True)


@pytest.mark.slow
def test_launcher_api(model, tmp_path):
    launcher = mpirun_prefix(2)
    env = mpi_env()
    s = stage(str(model), str(tmp_path / "n{rank}"), launcher, env=env, per_rank=True, chunk_size=1 << 20)
    assert s["nodes"] == 2 and s["failed_nodes"] == 0
    (tmp_path / "m1").write_text("in the way")
    with pytest.raises(StageError, match=r"\(rank 1\): cannot create directory"):
        stage(str(model), str(tmp_path / "m{rank}" / "x"), launcher, env=env, per_rank=True)


@pytest.mark.parametrize("args, message", [
    (["--chunk-size", "1K"], "--chunk-size 1024 is not between 64K and 1G"),
    (["--chunk-size", "lots"], "is not a size"),
    (["--hf-repo", "noslash"], "is not of the form ORG/NAME"),
    (["--window", "0"], "--window must be between 1 and 1024"),
    (["--lock-timeout", "-1"], "--lock-timeout -1 is not a number of seconds"),
    (["--lock-stall", "-5"], "--lock-stall -5 is not a number of seconds"),
])
def test_usage_errors_are_one_line(args, message, tmp_path):
    proc = subprocess.run([os.sys.executable, "-m", "aegis", "stage", *args, str(tmp_path), str(tmp_path / "d")],
                          capture_output=True, text=True, env=mpi_env())
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and proc.stderr.startswith("aegis: error:")


def test_missing_native_tool_is_a_usage_error(tmp_path):
    (tmp_path / "src").mkdir()
    proc = subprocess.run([os.sys.executable, "-m", "aegis", "stage", "--impl", "native", str(tmp_path / "src"),
                           str(tmp_path / "d")], capture_output=True, text=True,
                          env=mpi_env({"AEGIS_STAGE_BIN": str(tmp_path / "nope")}))
    assert proc.returncode == 2 and "the compiled aegis-stage is not installed" in proc.stderr


def test_fallback_without_mpi4py_is_one_line(tmp_path):
    """mpi4py is an extra (aegis-hpc[mpi]): without it the fallback says how to get it, no traceback."""
    (tmp_path / "src").mkdir()
    code = ("import sys; sys.modules['mpi4py'] = None; from aegis.cli import main; "
            f"main(['stage', '--impl', 'mpi4py', {str(tmp_path / 'src')!r}, {str(tmp_path / 'd')!r}])")
    proc = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "pip install 'aegis-hpc[mpi]'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_native_binary_rejects_bad_options():
    from aegis.staging import find_binary

    proc = subprocess.run([find_binary(), "--chunk-size", "3", "a", "b"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("aegis: error: --chunk-size 3")
    proc = subprocess.run([find_binary(), "--lock-stall", "soon", "a", "b"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("aegis: error: --lock-stall soon is not a number")


@pytest.mark.slow
def test_private_dir_is_created_0700_and_a_planted_one_refused(impl, model, tmp_path):
    """Issue 17: staged weights lived at a shared, predictable node-local path; another user who planted a
    marker and matching files there got them loaded. --private-dir (aegis launch passes
    <local_storage>/aegis-<user>) is created 0700, and one owned by another user, or open to others, fails
    that node before any marker is trusted."""
    dest = tmp_path / "node{rank}" / "aegis-me" / "models" / "m"
    s = ok(run_stage(impl, 2, model, dest, "--private-dir", str(tmp_path / "node{rank}" / "aegis-me"), *CHUNK))
    assert s["failed_nodes"] == 0
    for r in range(2):
        assert os.stat(tmp_path / f"node{r}" / "aegis-me").st_mode & 0o777 == 0o700
        assert tree_digest(tmp_path / f"node{r}" / "aegis-me" / "models" / "m") == tree_digest(model)
    os.chown(tmp_path / "node1" / "aegis-me", 65534, 65534)  # as if another user (nobody) had made it first
    os.chmod(tmp_path / "node0" / "aegis-me", 0o755)  # open to others
    proc = run_stage(impl, 2, model, dest, "--private-dir", str(tmp_path / "node{rank}" / "aegis-me"), *CHUNK)
    assert proc.returncode != 0 and summary(proc)["failed_nodes"] == 2 and summary(proc)["skipped_nodes"] == 0
    assert "is not private (owner uid 65534, mode 0700" in proc.stderr
    assert "mode 0755" in proc.stderr and "Traceback" not in proc.stderr
    bad = run_stage(impl, 1, model, tmp_path / "elsewhere", "--private-dir", str(tmp_path / "priv"))
    assert bad.returncode == 2 and "must hold DEST" in bad.stderr


@pytest.mark.slow
def test_stale_temporaries_are_dropped_and_dest_inside_src_refused(impl, model, tmp_path):
    """Issue 17: full-size .aegis-part.* temporaries of an interrupted staging of other content stayed in DEST
    forever; DEST inside SRC was accepted (each staging would copy the last one)."""
    dest = tmp_path / "node{rank}" / "model"
    for r in range(2):
        sub = tmp_path / f"node{r}" / "model" / "sub"
        sub.mkdir(parents=True)
        (sub.parent / ".aegis-part.deadbeef.0").write_bytes(b"\0" * 4096)
        (sub / ".aegis-part.deadbeef.7").write_bytes(b"\0" * 4096)
    ok(run_stage(impl, 2, model, dest, *CHUNK))
    for r in range(2):
        assert not leftovers(tmp_path / f"node{r}" / "model")
        assert not list((tmp_path / f"node{r}" / "model").rglob(".aegis-part.*"))
    inside = run_stage(impl, 1, model, model / "copy", *CHUNK)
    assert inside.returncode == 2 and "is inside SRC" in inside.stderr and "Traceback" not in inside.stderr
