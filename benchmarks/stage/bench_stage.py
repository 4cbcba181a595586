"""Benchmark `aegis stage` against the tar|bcast|tar baseline, cp -r per rank and the machine's limits.

    python benchmarks/stage/bench_stage.py [--ranks 2,4] [--repeat 3] [--file-size 512M] [--files 8]
                                           [--workdir /var/tmp/aegis-stage-bench] [--sweep 1M,2M,4M,16M,64M]
                                           [--parts methods,restage,sweep]

The restage part times, in the same run, a full staging and the re-stage after one weight file of SRC
changed (only that file goes over the ring), with both implementations, and prints their ratio.

Every figure is a median wall time of `mpirun` commands measured in this run (mpirun start-up
included for every method alike); ratios compare figures from the same run. Each rank is its own
"node" with its own destination directory (--per-rank). The chunk-size sweep fits
t(C) = (T/C + N - 1) * (alpha + C/B) and predicts 140 GB to 1,024 nodes at 20 GB/s per NIC.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

from aegis.staging import find_binary  # noqa: E402
from aegis.staging.options import parse_size  # noqa: E402

WRITER = """
import os, sys
from mpi4py import MPI
r = MPI.COMM_WORLD.Get_rank(); path = sys.argv[1].replace('{rank}', str(r)); total = int(sys.argv[2])
os.makedirs(os.path.dirname(path), exist_ok=True)
buf = os.urandom(16 << 20); fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644); done = 0
while done < total:
    done += os.write(fd, buf[: min(len(buf), total - done)])
os.close(fd); MPI.COMM_WORLD.Barrier()
"""


def env() -> dict:
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                PYTHONPATH=REPO)


def mpirun(n: int) -> list[str]:
    return ["mpirun", "-n", str(n), "--oversubscribe", "--bind-to", "none"]


def timed(argv: list[str], check: bool = True) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env())
    dt = time.perf_counter() - t0
    if check and r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(argv)}\n{r.stdout}\n{r.stderr}")
    return dt, r.stdout


def write_random(path: str, size: int) -> None:
    """`size` incompressible bytes, written 64 MiB at a time."""
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 64 << 20)
            fh.write(os.urandom(n))
            left -= n


def make_source(src: str, files: int, size: int) -> int:
    """8 incompressible weight files plus small JSON/tokenizer files; reused when already there."""
    os.makedirs(src, exist_ok=True)
    total = 0
    for i in range(files):
        p = os.path.join(src, f"model-{i + 1:05d}-of-{files:05d}.safetensors")
        if not (os.path.exists(p) and os.path.getsize(p) == size):
            write_random(p, size)
        total += size
    small = {"config.json": '{"hidden_size": 8192, "num_hidden_layers": 80}',
             "generation_config.json": '{"do_sample": true}',
             "tokenizer_config.json": '{"model_max_length": 8192}',
             "tokenizer.json": json.dumps({"vocab": {f"t{i}": i for i in range(50000)}}),
             "model.safetensors.index.json": json.dumps({"weight_map": {f"w{i}": "x" for i in range(2000)}})}
    for name, text in small.items():
        with open(os.path.join(src, name), "w") as fh:
            fh.write(text)
        total += len(text.encode())
    # warm the page cache so every method reads the source from memory alike
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as fh:
            while fh.read(64 << 20):
                pass
    return total


def clean(dest_root: str) -> None:
    shutil.rmtree(dest_root, ignore_errors=True)
    os.makedirs(dest_root, exist_ok=True)
    subprocess.run(["sync"])


def memcpy_gbps() -> float:
    a = np.frombuffer(os.urandom(1 << 28), dtype=np.uint8).copy()
    b = np.empty_like(a)
    best = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best.append(a.nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(best)


def methods(n: int, src: str, dest: str, chunk: str) -> dict[str, list[str]]:
    py = sys.executable
    d = os.path.join(dest, "n{rank}", "model")
    return {
        "aegis-native": [*mpirun(n), find_binary() or "aegis-stage-missing", "--per-rank", "--json",
                         "--chunk-size", chunk, src, d],
        "aegis-mpi4py": [*mpirun(n), py, "-m", "aegis", "stage", "--impl", "mpi4py", "--per-rank", "--json",
                         "--chunk-size", chunk, src, d],
        "tar|bcast|tar": [*mpirun(n), py, os.path.join(HERE, "tar_bcast.py"), src, d],
        "cp -r per rank": [*mpirun(n), "sh", "-c", 'mkdir -p "$0/n$OMPI_COMM_WORLD_RANK" && '
                           'cp -r "$1" "$0/n$OMPI_COMM_WORLD_RANK/model"', dest, src],
    }


def change_one_file(src: str, files: int, size: int) -> str:
    """Rewrite the first weight file with new random bytes (same size, new mtime); returns its path."""
    p = os.path.join(src, f"model-{1:05d}-of-{files:05d}.safetensors")
    write_random(p, size)
    return p


def restage(a, src: str, dest: str, total: int, out: dict) -> None:
    """Full staging vs the re-stage after a 1-file change, per implementation and rank count (medians)."""
    size = parse_size(a.file_size)
    for n in [int(x) for x in a.ranks.split(",")]:
        for impl in ("aegis-native", "aegis-mpi4py"):
            if impl in {s.strip() for s in a.skip.split(",")}:
                continue
            argv = methods(n, src, dest, a.chunk_size)[impl]
            full, again, sent, same = [], [], [], []
            for _ in range(a.repeat):
                clean(dest)
                full.append(timed(argv)[0])
                same.append(timed(argv)[0])  # nothing changed: every node skips (the floor: start-up, checks)
                change_one_file(src, a.files, size)
                dt, stdout = timed(argv)
                again.append(dt)
                s = json.loads(stdout.strip().splitlines()[-1])
                assert s["bytes_sent"] == size and s["files_sent"] == 1, s
                sent.append(s["bytes_sent"])
            f, r, z = statistics.median(full), statistics.median(again), statistics.median(same)
            out.setdefault("restage", {}).setdefault(str(n), {})[impl] = {
                "full_s": full, "restage_s": again, "unchanged_s": same, "bytes_sent": sent[0], "bytes": total,
                "ratio": r / f}
            print(f"  restage, {impl}, {n} ranks: full staging {f:.2f} s, after a 1-file change {r:.2f} s "
                  f"({sent[0] / 1e9:.2f} of {total / 1e9:.2f} GB sent), nothing changed {z:.2f} s: "
                  f"re-stage / full = {r / f:.2f} ({f / r:.1f}x faster); runs {', '.join(f'{x:.2f}' for x in full)}"
                  f" / {', '.join(f'{x:.2f}' for x in again)} / {', '.join(f'{x:.2f}' for x in same)} s", flush=True)
    clean(dest)


def fit(points: list[tuple[int, float]], total: int, n: int) -> tuple[float, float]:
    """Least squares for t = (T/C + N - 1) * alpha + (T/C + N - 1) * C / B; returns (alpha s, B bytes/s)."""
    rows, ys = [], []
    for c, t in points:
        k = -(-total // c) + n - 1
        rows.append([k, k * c])
        ys.append(t)
    (alpha, inv_b), *_ = np.linalg.lstsq(np.array(rows, float), np.array(ys, float), rcond=None)
    return max(alpha, 0.0), 1.0 / inv_b if inv_b > 0 else float("inf")


def predict(total: float, n: int, c: float, alpha: float, b: float) -> float:
    return (total / c + n - 1) * (alpha + c / b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/var/tmp/aegis-stage-bench")
    ap.add_argument("--dest-dir", help="where the per-rank copies go (default WORKDIR/dest)")
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--file-size", default="512M")
    ap.add_argument("--chunk-size", default="16M")
    ap.add_argument("--sweep", default="1M,2M,4M,16M,64M")
    ap.add_argument("--sweep-ranks", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated methods to leave out")
    ap.add_argument("--json-out", help="write all figures here")
    ap.add_argument("--parts", default="methods,restage,sweep", help="which measurements to run")
    a = ap.parse_args()
    parts = {p.strip() for p in a.parts.split(",")}
    src = os.path.join(a.workdir, "src")
    dest = a.dest_dir or os.path.join(a.workdir, "dest")
    total = make_source(src, a.files, parse_size(a.file_size))
    out = {"bytes": total, "files": a.files + 5, "cores": os.cpu_count(), "load_before": os.getloadavg(),
           "runs": {}, "sweep": {}}
    out["memcpy_gbps"] = memcpy_gbps()
    print(f"source: {total / 1e9:.2f} GB in {a.files} x {a.file_size} + 5 small files; {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; memcpy {out['memcpy_gbps']:.1f} GB/s", flush=True)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    for n in [int(x) for x in a.ranks.split(",")] if "methods" in parts else []:
        res: dict[str, list[float]] = {}
        for rep in range(a.repeat):
            for name, argv in methods(n, src, dest, a.chunk_size).items():
                if name in skip:
                    continue
                clean(dest)
                dt, _ = timed(argv)
                res.setdefault(name, []).append(dt)
            clean(dest)
            dt, _ = timed([*mpirun(n), sys.executable, "-c", WRITER, os.path.join(dest, "n{rank}", "fresh"),
                           str(total)])
            res.setdefault("limit: fresh-file write", []).append(dt)
            print(f"  {n} ranks, run {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in res.items()),
                  flush=True)
        clean(dest)
        med = {k: statistics.median(v) for k, v in res.items()}
        out["runs"][n] = {"median_s": med, "all_s": res}
        nat = med.get("aegis-native")
        print(f"\n{n} ranks ({n} nodes simulated), {total / 1e9:.2f} GB each, median of {a.repeat}:")
        for k, v in med.items():
            print(f"  {k:26s} {v:7.2f} s  {total / v / 1e9:6.2f} GB/s per rank")
        if nat:
            for k in ("tar|bcast|tar", "cp -r per rank"):
                if k in med:
                    print(f"  speed-up of aegis-native over {k}: {med[k] / nat:.2f}x")
            print(f"  aegis-native / machine limit (fresh-file write of the same bytes): "
                  f"{med['limit: fresh-file write'] / nat:.2f}")
            if "aegis-mpi4py" in med:
                print(f"  speed-up of aegis-native over aegis-mpi4py: {med['aegis-mpi4py'] / nat:.2f}x")
        print(flush=True)
    if "restage" in parts:
        restage(a, src, dest, total, out)
    if "sweep" not in parts:
        out["load_after"] = os.getloadavg()
        if a.json_out:
            with open(a.json_out, "w") as fh:
                json.dump(out, fh, indent=1)
        return
    # chunk-size sweep with the compiled tool, fitted to the pipeline model
    n = a.sweep_ranks
    points = []
    for c in [parse_size(x) for x in a.sweep.split(",") if x]:
        ts = []
        for _ in range(max(1, a.repeat - 1)):
            clean(dest)
            _, stdout = timed(methods(n, src, dest, str(c))["aegis-native"])
            ts.append(json.loads(stdout.strip().splitlines()[-1])["phases"]["network"])
        points.append((c, statistics.median(ts)))
        print(f"  sweep: chunk {c >> 10:6d} KiB: transfer {points[-1][1]:.2f} s "
              f"({total / points[-1][1] / 1e9:.2f} GB/s)", flush=True)
    clean(dest)
    alpha, b = fit(points, total, n)
    out["sweep"] = {"ranks": n, "points": points, "alpha_s": alpha, "bandwidth_Bps": b}
    print(f"\nfit on {n} ranks: per-chunk overhead alpha = {alpha * 1e3:.3f} ms, bandwidth B = {b / 1e9:.2f} GB/s")
    big, nodes, nic = 140e9, 1024, 20e9
    c16 = 16 << 20
    c_opt = (alpha * big * nic / (nodes - 1)) ** 0.5 if alpha > 0 else c16
    for c in sorted({c16, c_opt}):
        t = predict(big, nodes, c, alpha, nic)
        print(f"prediction: 140 GB to 1,024 nodes at 20 GB/s per NIC, chunk {c / 2**20:.1f} MiB: {t:.1f} s "
              f"(lower bound 140 GB / 20 GB/s = {big / nic:.1f} s)")
    out["prediction"] = {"alpha_s": alpha, "nic_Bps": nic, "t_16MiB_s": predict(big, nodes, c16, alpha, nic),
                         "c_opt": c_opt, "t_copt_s": predict(big, nodes, c_opt, alpha, nic)}
    out["load_after"] = os.getloadavg()
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
