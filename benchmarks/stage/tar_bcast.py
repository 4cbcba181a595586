"""Baseline re-created from the public predecessors: tar | 1 GiB blocking MPI_Bcast | tar (one reader, no overlap).

    mpirun -n R python benchmarks/stage/tar_bcast.py SRC DEST_WITH_{rank}
"""
import os
import subprocess
import sys

import numpy as np
from mpi4py import MPI

BLOCK = 1 << 30


def main():
    src, dest = sys.argv[1], sys.argv[2]
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    out = dest.replace("{rank}", str(rank))
    os.makedirs(out, exist_ok=True)
    untar = subprocess.Popen(["tar", "-x", "-f", "-", "-C", out], stdin=subprocess.PIPE)
    buf = np.empty(BLOCK, dtype=np.uint8)
    mv = memoryview(buf)
    tar = subprocess.Popen(["tar", "-c", "-f", "-", "-C", src, "."], stdout=subprocess.PIPE) if rank == 0 else None
    n = np.zeros(1, dtype=np.int64)
    while True:
        if rank == 0:
            got = 0
            while got < BLOCK:
                r = tar.stdout.readinto(mv[got:])
                if not r:
                    break
                got += r
            n[0] = got
        comm.Bcast(n, root=0)
        if n[0] == 0:
            break
        comm.Bcast([buf, int(n[0]), MPI.BYTE], root=0)
        untar.stdin.write(mv[: int(n[0])])
    untar.stdin.close()
    rc = untar.wait()
    if tar is not None:
        rc |= tar.wait()
    comm.Barrier()
    sys.exit(rc)


if __name__ == "__main__":
    main()
