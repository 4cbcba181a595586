"""Wait until a Ray cluster has every node and device of an instance, then exec the server (engine's Python).

    python aegis_raywait.py --address HEAD:PORT --nodes N --gpus G --timeout S [--host NAME ...] -- vllm serve ...

vLLM's own multi-node example (examples/online_serving/multi-node-serving.sh) counts
`ray.nodes()` entries that are "Alive" after `ray.init()`; ALCF's setup_ray_cluster.sh waits
for `ray status` ("should show 2 active nodes and 16 GPUs total"). This does both: alive
nodes and their "GPU" resource (vLLM's ray_device_key on CUDA, ROCm and XPU). On timeout it
prints one line naming what is missing (the hosts whose Ray has not joined) and exits 1.
Standard library and the engine's own Ray only: aegis need not be installed there.
"""
import argparse
import os
import socket
import sys
import time

POLL = 2.0


def resolve(host):
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--host", action="append", default=[], help="a node of the instance (named when missing)")
    parser.add_argument("server", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    server = args.server[1:] if args.server[:1] == ["--"] else args.server
    if not server:
        parser.error("no server command after --")
    try:
        import ray
    except ImportError:
        print(f"aegis: {sys.executable} has no Ray (multinode_backend: ray needs it next to vLLM); install ray "
              "there or set multinode_backend: native", file=sys.stderr, flush=True)
        return 2
    deadline = time.monotonic() + args.timeout
    while True:  # the head's `ray start` starts at the same time as this
        try:
            ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
            break
        except Exception as exc:  # ConnectionError, or a RuntimeError while the local raylet registers
            if time.monotonic() > deadline:
                print(f"aegis: no Ray head answers at {args.address} after {args.timeout:g} s ({exc}); see the "
                      "instance's ray-head log", file=sys.stderr, flush=True)
                return 1
            time.sleep(POLL)
    while True:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in alive)
        if len(alive) >= args.nodes and gpus >= args.gpus:
            break
        if time.monotonic() > deadline:
            seen = {n.get("NodeManagerAddress") for n in alive}
            missing = [h for h in args.host if resolve(h) not in seen]
            print(f"aegis: the Ray cluster at {args.address} has {len(alive)} of {args.nodes} node(s) and {gpus:g} "
                  f"of {args.gpus} GPU(s) after {args.timeout:g} s; not joined: {', '.join(missing) or 'unknown'} "
                  "(see those nodes' ray start logs)", file=sys.stderr, flush=True)
            ray.shutdown()
            return 1
        time.sleep(POLL)
    print(f"aegis: the Ray cluster at {args.address} has {len(alive)} node(s) and {gpus:g} GPU(s); starting "
          f"{os.path.basename(server[0])}", flush=True)
    ray.shutdown()
    os.execvp(server[0], server)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
