"""Fill vLLM's model-info cache in this process, then exec the server (a site known issue's workaround).

    python aegis_modelinfo.py --model MODEL -- python -m vllm.entrypoints.openai.api_server ...

ALCF's vLLM page for Aurora (docs/aurora/data-science/inference/vllm.md, "Known Issue"): the first
run of a model fails with "validation error for ModelConfig" unless the `modelinfos` in
VLLM_CACHE_ROOT are populated first; ALCF's workaround script builds them directly. The cause
(argonne-lcf/frameworks-sdk, xpu-model-inspection-hidden-sigsegv): vLLM inspects a model class
in a subprocess (registry.py `_run_in_subprocess`), and that subprocess crashes on XPU. This
runs vLLM's own inspection of the model's architectures in this process instead, so vLLM's own
code writes its cache file (`modelinfos/<module>-<class>.json`, keyed by the module's hash) and
the server finds it. A small record of ours next to it (`.aegis-<arch>.json`: the module file's
size and mtime) lets later starts skip importing vLLM here. Whatever fails is said in one line
and the server starts anyway (the cache is an optimisation of vLLM's, never required).
Standard library and the engine's own vLLM: aegis need not be installed where this runs.
"""
import argparse
import json
import os
import sys


def cache_root():
    """VLLM_CACHE_ROOT as vLLM's envs.py computes it (without importing vLLM, which imports torch)."""
    default = os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "vllm")
    return os.path.expanduser(os.getenv("VLLM_CACHE_ROOT", default))


def architectures(model):
    """The `architectures` of the model's config.json: a directory, or a repository in the local HF cache."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache
            found = try_to_load_from_cache(model, "config.json")
        except Exception:
            found = None
        if not isinstance(found, str):
            return None
        path = found
    try:
        with open(path) as fh:
            archs = json.load(fh).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return [a for a in archs if isinstance(a, str)]


def _record(arch):
    return os.path.join(cache_root(), "modelinfos", f".aegis-{arch}.json")


def _stat(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def fresh(arch):
    """Whether an earlier start filled the cache for `arch` and vLLM's module file has not changed since."""
    try:
        with open(_record(arch)) as fh:
            rec = json.load(fh)
        return _stat(rec["module_file"]) == rec["stat"] and os.path.isfile(rec["cache_file"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def fill(arch):
    """vLLM's own inspection of `arch`, in this process; our record of it. Returns the cache file."""
    import importlib.util

    import vllm.model_executor.models.registry as registry

    model = registry.ModelRegistry.models.get(arch)
    if model is None or not hasattr(model, "module_name"):
        return None  # unknown to this vLLM, or already imported (nothing to cache)
    in_process = registry._run_in_subprocess
    registry._run_in_subprocess = lambda fn: fn()  # the inspection the subprocess would have run
    try:
        model.inspect_model_cls()
    finally:
        registry._run_in_subprocess = in_process
    spec = importlib.util.find_spec(model.module_name)
    module_file = spec.origin if spec is not None else None
    cache_file = os.path.join(cache_root(), "modelinfos", model._get_cache_filename())
    if module_file and os.path.isfile(cache_file):
        tmp = _record(arch) + f".{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"module_file": module_file, "stat": _stat(module_file), "cache_file": cache_file}, fh)
        os.replace(tmp, _record(arch))
    return cache_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("server", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    server = args.server[1:] if args.server[:1] == ["--"] else args.server
    if not server:
        parser.error("no server command after --")
    archs = architectures(args.model)
    if archs is None:
        print(f"aegis: no config.json for {args.model} here; vLLM's model-info cache is not filled first",
              file=sys.stderr, flush=True)
    for arch in [a for a in archs or [] if not fresh(a)]:
        try:
            where = fill(arch)
            print(f"aegis: vLLM's model-info cache for {arch}: {where or 'nothing to fill'}", file=sys.stderr,
                  flush=True)
        except Exception as exc:  # a vLLM without this cache or these internals: the server decides
            print(f"aegis: could not fill vLLM's model-info cache for {arch} ({type(exc).__name__}: {exc}); "
                  "starting the server anyway", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execvp(server[0], server)


if __name__ == "__main__":
    sys.exit(main())
