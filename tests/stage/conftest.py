"""Helpers for the stage tests: a real Open MPI mpirun, per-rank "nodes", a model-like tree."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aegis.staging import find_binary

REPO = Path(__file__).resolve().parents[2]
IMPLS = ["native", "mpi4py"]


def mpi_env(extra: dict | None = None) -> dict:
    """Environment for mpirun as root on a 2-core machine."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONPATH=str(REPO))
    env.pop("AEGIS_STAGE_BIN", None)
    env.update(extra or {})
    return env


def mpirun_prefix(n: int) -> list[str]:
    """The launcher: Open MPI's mpirun with n oversubscribed ranks."""
    exe = shutil.which("mpirun")
    assert exe, "mpirun not found: tests/setup.d/10-apt.sh installs openmpi-bin"
    return [exe, "-n", str(n), "--oversubscribe", "--bind-to", "none"]


def stage_cmd(impl: str, n: int, src, dest, *opts: str, per_rank: bool = True) -> list[str]:
    """The mpirun command line of `aegis stage` on n ranks (each its own node with per_rank)."""
    argv = [*mpirun_prefix(n), sys.executable, "-m", "aegis", "stage", "--impl", impl, "--json"]
    if per_rank:
        argv.append("--per-rank")
    return argv + [*opts, str(src), str(dest)]


def run_stage(impl: str, n: int, src, dest, *opts: str, per_rank: bool = True, env: dict | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """`aegis stage` on n ranks (each its own node with per_rank); returns the finished process."""
    return subprocess.run(stage_cmd(impl, n, src, dest, *opts, per_rank=per_rank), capture_output=True,
                          text=True, env=mpi_env(env), timeout=timeout)


def start_stage(impl: str, n: int, src, dest, *opts: str, env: dict | None = None) -> subprocess.Popen:
    """`aegis stage` started in the background; finish it with finish()."""
    return subprocess.Popen(stage_cmd(impl, n, src, dest, *opts), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=mpi_env(env))


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def summary(proc: subprocess.CompletedProcess) -> dict:
    """The JSON summary line printed by rank 0."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, f"expected one summary line\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(lines[0])


def ok(proc: subprocess.CompletedProcess) -> dict:
    """Assert success and return the summary."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return summary(proc)


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256 of content, or 'link:target', or 'dir'} without aegis' own files."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if name.startswith(".aegis-"):
                continue
            if p.is_symlink() and not os.readlink(p).startswith("/"):
                out[rel] = "link:" + os.readlink(p)  # absolute links are staged as copies
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary files (.aegis-part*) left anywhere under root."""
    return [str(p) for p in root.rglob(".aegis-part*")] if root.exists() else []


class SentBytes:
    """Counts, outside the stage tools, the bytes every rank hands to MPI_Send/MPI_Isend (the ring's traffic)."""

    def __init__(self, lib: Path, folder: Path):
        self.lib, self.folder = lib, folder

    def env(self) -> dict:
        """The environment of one counted run (the last count is cleared)."""
        for f in self.folder.iterdir():
            f.unlink()
        return {"LD_PRELOAD": str(self.lib), "AEGIS_TEST_SENT_DIR": str(self.folder)}

    def total(self) -> int:
        """Bytes sent by all ranks of the last counted run."""
        counts = [int(f.read_text()) for f in self.folder.iterdir()]
        assert counts, "no rank wrote its count: was the run started with env()?"
        return sum(counts)


@pytest.fixture(scope="session")
def sent_lib(tmp_path_factory) -> Path:
    """tests/stage/sent_bytes.c (a PMPI wrapper) built with mpicc."""
    mpicc = shutil.which("mpicc")
    assert mpicc, "mpicc not found: tests/setup.d/10-apt.sh installs libopenmpi-dev"
    lib = tmp_path_factory.mktemp("sent-bytes") / "sent_bytes.so"
    subprocess.run([mpicc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(REPO / "tests" / "stage" / "sent_bytes.c")],
                   check=True)
    return lib


@pytest.fixture
def sent_bytes(sent_lib, tmp_path) -> SentBytes:
    folder = tmp_path / "sent-bytes"
    folder.mkdir()
    return SentBytes(sent_lib, folder)


@pytest.fixture(params=IMPLS)
def impl(request):
    """Each test runs against the compiled tool and the mpi4py fallback."""
    if request.param == "native":
        assert find_binary(), "build/aegis-stage missing: tests/setup.d/30-stage.sh builds it"
    return request.param


@pytest.fixture
def model(tmp_path) -> Path:
    """A small model-like tree: multi-chunk weights, JSON, an empty file and dir, links in and out."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "empty-dir").mkdir()
    rnd = os.urandom(3 * (1 << 20) + 12345)
    (src / "model-00001.safetensors").write_bytes(rnd)
    (src / "model-00002.safetensors").write_bytes(rnd[::-1][: 700_001])
    (src / "config.json").write_text('{"hidden_size": 256}')
    (src / "sub" / "tokenizer.json").write_text('{"vocab": {}}')
    (src / "zero-bytes").write_bytes(b"")
    (src / "odd name with space").write_bytes(b"x" * 100)
    os.chmod(src / "config.json", 0o640)
    os.symlink("sub/tokenizer.json", src / "tokenizer.json")          # inside SRC: kept as a link
    outside = tmp_path / "outside.txt"
    outside.write_text("lives outside SRC")
    os.symlink(str(outside), src / "outside-link")                     # outside SRC: copied as a file
    return src
