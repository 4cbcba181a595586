"""Run `ray start ...` of a Ray head, without its --ray-client-server-port where this Ray has no client package.

    python aegis_raystart.py /path/to/ray start --head ... --ray-client-server-port P ...

aegis gives every Ray cluster its own client-server port (the default 10001 would be wanted by every
head on a node), but `ray start` refuses that flag when `ray[client]` is not installed ("Ray Client
requires pip package `ray[client]`"; it tests `import grpc`, ray/_private/utils.py
get_ray_client_dependency_error) and then starts no client server at all. So the flag goes only where
grpc imports. Then it execs `ray` (the same process, same process group). Standard library only: it runs
with the engine's Python.
"""
import importlib.util
import os
import sys

FLAG = "--ray-client-server-port"


def argv_for(argv, has_client):
    """`argv` as given, less FLAG and its value when there is no client package."""
    out = list(argv)
    if not has_client:
        for i, arg in enumerate(out):
            if arg == FLAG:
                del out[i:i + 2]
                break
            if arg.startswith(FLAG + "="):
                del out[i]
                break
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: aegis_raystart.py RAY start ARGS...", file=sys.stderr)
        return 2
    argv = argv_for(argv, importlib.util.find_spec("grpc") is not None)
    os.execvp(argv[0], argv)  # a bare `ray`: the one on PATH
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
