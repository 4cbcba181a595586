"""`aegis stage SRC DEST`: run on every rank under mpiexec/srun; picks the compiled tool or mpi4py."""
from __future__ import annotations

import os
import sys

import click

from aegis.errors import UsageError
from aegis.staging import find_binary
from aegis.staging.options import StageOptions, parse_size


@click.command("stage", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src")
@click.argument("dest")
@click.option("--chunk-size", default="16M", show_default=True, help="Bytes per chunk (64K..1G).")
@click.option("--window", default=8, show_default=True, type=int, help="Chunks in flight per node.")
@click.option("--threads", default=4, show_default=True, type=int, help="I/O threads per node.")
@click.option("--verify", is_flag=True, help="Re-read the destination and compare checksums.")
@click.option("--force", is_flag=True, help="Re-send even where the completion marker matches.")
@click.option("--unpack", is_flag=True, help="SRC is a tar archive: unpack it into DEST once per node, "
              "keyed by its content hash.")
@click.option("--hf-repo", metavar="ORG/NAME", help="Write DEST as a Hugging Face hub cache "
              "(DEST/models--ORG--NAME/snapshots/REV) so vLLM finds ORG/NAME offline.")
@click.option("--hf-revision", metavar="REV", help="Snapshot name (default: the manifest digest).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--private-dir", metavar="DIR", help="An ancestor of DEST that must be this user's alone: "
              "created with mode 0700, or refused when it exists owned by another user or open to others.")
@click.option("--lock-timeout", default=1800, show_default=True, type=int, metavar="SECONDS",
              help="Wait at most this long for another staging into DEST on a node (0: do not wait).")
@click.option("--lock-stall", default=300, show_default=True, type=int, metavar="SECONDS",
              help="Give up at once when that other staging has made no progress for this long: it is stopped "
              "or hangs (0: wait for --lock-timeout).")
@click.option("--impl", type=click.Choice(["auto", "native", "mpi4py"]), default="auto", show_default=True,
              help="The compiled tool (native), the mpi4py fallback, or native when it is installed.")
@click.option("--per-rank", is_flag=True, hidden=True,
              help="Testing and benchmarks only: every rank acts as its own node (use {rank} in DEST).")
def stage_cmd(src, dest, chunk_size, window, threads, verify, force, unpack, hf_repo, hf_revision, as_json,
              private_dir, lock_timeout, lock_stall, impl, per_rank):
    """Copy SRC (a directory or a file) to DEST on every node, once, verified.

    Run it under mpiexec or srun with one or more ranks per node; the lowest rank on
    each node writes. A re-run with nothing changed returns at once. DEST may
    contain {rank}, {node} and {host}. See docs/stage.md.
    """
    opts = StageOptions(src=src, dest=dest, chunk_size=parse_size(chunk_size), window=window, threads=threads,
                        verify=verify, force=force, unpack=unpack, hf_repo=hf_repo, hf_revision=hf_revision,
                        json=as_json, per_rank=per_rank, private_dir=private_dir,
                        lock_timeout=lock_timeout, lock_stall=lock_stall).validate()
    binary = find_binary() if impl != "mpi4py" else None
    if impl == "native" and binary is None:
        raise UsageError("the compiled aegis-stage is not installed; set AEGIS_STAGE_BIN, reinstall with mpicc "
                         "and cmake on PATH, or use --impl mpi4py")
    if binary is not None:
        # This MPI rank becomes the compiled tool (MPI is not initialised yet in this process).
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(binary, [binary, *opts.argv()])
    from aegis.staging import mpi_stage

    code = mpi_stage.run(opts)
    if code:
        sys.exit(code)
