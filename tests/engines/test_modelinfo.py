"""Aurora's vLLM known issue: aegis_modelinfo.py fills vLLM's model-info cache in-process, with the real CPU vLLM.

The truth is vLLM's own reader: after the fill, a fresh vLLM process whose subprocess inspection is made to
fail (as it crashes on XPU, argonne-lcf/frameworks-sdk xpu-model-inspection-hidden-sigsegv) still gets the
model's info, from the cache file vLLM wrote (registry.py `_load_modelinfo_from_cache`, keyed by the module's
hash). Without the fill, the same process fails: the check can fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from aegis.engines.vllm import MODELINFO_SCRIPT

pytestmark = pytest.mark.slow

# A vLLM process that may not inspect a model class in a subprocess: only vLLM's cache can answer.
NO_SUBPROCESS = """
import json, sys
import vllm.model_executor.models.registry as r
def crash(fn):
    raise RuntimeError("inspection subprocess crashed (as on XPU)")
r._run_in_subprocess = crash
info = r.ModelRegistry.models["LlamaForCausalLM"].inspect_model_cls()
print(json.dumps({"from_cache": True, "is_text_generation_model": info.is_text_generation_model}))
"""


def _env(cache):
    return {**os.environ, "VLLM_CACHE_ROOT": str(cache), "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}


def test_the_fill_writes_the_cache_vllm_reads_then_execs_the_server(vllm_env, tmp_path):
    cache = tmp_path / "vllm-cache"
    py = str(vllm_env.python)
    before = subprocess.run([py, "-c", NO_SUBPROCESS], env=_env(cache), capture_output=True, text=True, timeout=300)
    assert before.returncode != 0 and "crashed (as on XPU)" in before.stderr  # no cache: vLLM needs the subprocess

    out = tmp_path / "exec.txt"
    server = [py, "-c", f"open({str(out)!r}, 'w').write('server ran')"]
    fill = subprocess.run([py, MODELINFO_SCRIPT, "--model", str(vllm_env.model_dir), "--", *server],
                          env=_env(cache), capture_output=True, text=True, timeout=300)
    assert fill.returncode == 0, fill.stderr[-2000:]
    assert out.read_text() == "server ran"  # exec'd after the fill
    written = cache / "modelinfos" / "vllm-model_executor-models-llama-LlamaForCausalLM.json"
    assert written.is_file() and f"cache for LlamaForCausalLM: {written}" in fill.stderr

    after = subprocess.run([py, "-c", NO_SUBPROCESS], env=_env(cache), capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr[-2000:]
    assert json.loads(after.stdout.splitlines()[-1]) == {"from_cache": True, "is_text_generation_model": True}

    # Filled once: a later start does not import vLLM here (our record of the module file is current).
    t0 = time.monotonic()
    again = subprocess.run([py, MODELINFO_SCRIPT, "--model", str(vllm_env.model_dir), "--", *server],
                           env=_env(cache), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "cache for" not in again.stderr, again.stderr
    print(f"model-info fill: first start {fill.stderr.count('cache for')} arch filled; later start "
          f"{time.monotonic() - t0:.2f} s before exec")


def test_no_config_and_a_failing_fill_still_start_the_server(vllm_env, tmp_path):
    out = tmp_path / "exec.txt"
    server = [str(vllm_env.python), "-c", f"open({str(out)!r}, 'w').write('ok')"]
    proc = subprocess.run([str(vllm_env.python), MODELINFO_SCRIPT, "--model", "org/not-in-any-cache", "--",
                           *server], env=_env(tmp_path / "c"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and out.read_text() == "ok"
    assert proc.stderr.strip().splitlines() == [
        "aegis: no config.json for org/not-in-any-cache here; vLLM's model-info cache is not filled first"]
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["NoSuchArchForCausalLM"]}))
    out.unlink()
    proc = subprocess.run([str(vllm_env.python), MODELINFO_SCRIPT, "--model", str(bad), "--", *server],
                          env=_env(tmp_path / "c"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.read_text() == "ok", proc.stderr
    assert "NoSuchArchForCausalLM: nothing to fill" in proc.stderr
