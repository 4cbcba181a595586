"""Sweep specs: expansion, stable hashes, one-line validation errors, rendered job scripts, the shipped examples."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from aegis.errors import ConfigError
from aegis.sweep.cli import sweep_cmd
from aegis.sweep.expand import apply_settings, expand, short_hash
from aegis.sweep.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "sweeps").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"


def write(tmp_path, data) -> str:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(p)


BASE = {"base": {"model": "org/m", "tensor_parallel_size": 2, "extra_vllm_args": ["--max-num-seqs", "64"]},
        "site": "h200", "bench": {"rate": 2, "num_requests": 10}}


def test_examples_are_three_and_expand():
    assert len(EXAMPLES) == 3
    counts = {p.name: len(expand(load_spec(str(p)))) for p in EXAMPLES}
    assert counts == {"h200-glm46-throughput.yaml": 16, "h200-lora-budget.yaml": 7, "local-tiny-4.yaml": 4}


@pytest.mark.parametrize("name", ["h200-glm46-throughput", "h200-lora-budget", "local-tiny-4"])
def test_dry_run_matches_golden(name, monkeypatch):
    monkeypatch.chdir(REPO)
    r = CliRunner().invoke(sweep_cmd, [f"examples/sweeps/{name}.yaml", "--dry-run"])
    assert r.exit_code == 0, r.output
    golden = GOLDEN / f"{name}.txt"
    assert r.output == golden.read_text(), f"dry-run of {name} changed; if intended, regenerate {golden}"


def test_hashes_stable_across_processes():
    """Same spec -> same hashes in a fresh interpreter (no dict/set ordering or PYTHONHASHSEED leaks)."""
    spec = str(REPO / "examples/sweeps/h200-glm46-throughput.yaml")
    here = [p.hash for p in expand(load_spec(spec))]
    code = ("import json,sys;from aegis.sweep.expand import expand;from aegis.sweep.spec import load_spec;"
            f"print(json.dumps([p.hash for p in expand(load_spec({spec!r}))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert json.loads(out.stdout) == here
    assert len(set(here)) == 16


def test_axes_product_order_and_mapping(tmp_path):
    spec = load_spec(write(tmp_path, {**BASE, "axes": {"max_num_seqs": [128, 256], "kv_cache_dtype": ["auto", "fp8"],
                                                       "enable_chunked_prefill": [False]}}))
    points = expand(spec)
    assert [p.label for p in points] == ["seqs128-kvauto-ecpoff", "seqs128-kvfp8-ecpoff", "seqs256-kvauto-ecpoff",
                                         "seqs256-kvfp8-ecpoff"]
    m = points[1].config.models[0]
    assert m.kv_cache_dtype == "fp8"  # a config key is set as such
    # an unknown key is an engine argument, replacing the base's value; false -> --no-flag
    assert m.extra_vllm_args == ["--max-num-seqs", "128", "--no-enable-chunked-prefill"]
    assert points[0].hash != points[1].hash and len(points[0].hash) == 8


def test_hash_ignores_spelling_but_not_values(tmp_path):
    a = expand(load_spec(write(tmp_path, {**BASE, "axes": {"kv_cache_dtype": ["fp8"]}})))[0]
    b = expand(load_spec(write(tmp_path, {**BASE, "include": [{"name": "x", "set": {"kv_cache_dtype": "fp8"}}]})))[0]
    assert a.hash == b.hash  # same resolved configuration, written two ways
    assert short_hash({"a": 1, "b": 2}) == short_hash({"b": 2, "a": 1})


def test_lora_budget_goes_into_lora_block():
    points = expand(load_spec(str(REPO / "examples/sweeps/h200-lora-budget.yaml")))
    assert [p.config.models[0].lora.max_loras for p in points] == [128, 64, 32, 16, 8, 4, 2]
    assert all(p.config.models[0].lora.max_cpu_loras == 128 for p in points)


@pytest.mark.parametrize("data, expected", [
    ({**BASE, "axes": {"max_num_seqs": 5}}, "spec.yaml: axes.max_num_seqs: must be a non-empty list"),
    ({**BASE, "axes": {"tensor_paralel_size": [1]}}, "looks like the config key 'tensor_parallel_size'"),
    ({**BASE, "axes": {"tensor_parallel_size": [0]}}, "tensor_parallel_size: input should be greater than 0"),
    ({**BASE, "axs": {}}, "spec.yaml: axs: unknown key (did you mean 'axes'?)"),
    ({**BASE, "axes": {"a": [1]}, "bench": {"rat": 2}}, "spec.yaml: bench.rat: not an option of aegis bench"),
    ({**BASE, "axes": {"a": [1]}, "bench": {"rate": 2, "num_requests": 1, "output_dir": "x"}},
     "bench.output_dir: is set by the sweep"),
    ({**BASE, "axes": {"a": [1]}, "slo": {"p95_ttft_ms": 3}}, "spec.yaml: slo.p95_ttft_ms: must be max_<metric>"),
    ({**BASE, "include": [{"name": "a", "set": {}}, {"name": "a", "set": {"b": 1}}]},
     "include[1].name: 'a' is used twice"),
    ({**BASE, "axes": {"max_num_seqs": [1]}, "include": [{"name": "dup", "set": {"max_num_seqs": 1}}]},
     "is the same configuration as 'seqs1'"),
    ({**BASE, "axes": {"enable_eplb": [True]}}, "enable_eplb: only applies with expert parallelism"),
    ({"base": {"model": "m"}, "axes": {"a": [1]}}, "spec.yaml: bench: say what runs"),
    ({**BASE, "axes": {"instances": [64]}, "base": {**BASE["base"], "nodes": 1}}, "spec.yaml: axes (inst64)"),
])
def test_validation_errors_are_one_line(tmp_path, data, expected):
    path = write(tmp_path, data)
    r = CliRunner().invoke(sweep_cmd, [path, "--dry-run"])
    assert r.exit_code != 0
    assert isinstance(r.exception, ConfigError) or r.exception.__class__.__name__.endswith("Error")
    msg = str(r.exception)
    assert "\n" not in msg and expected in msg, msg


def test_render_writes_valid_job_scripts(tmp_path):
    out = tmp_path / "jobs"
    r = CliRunner().invoke(sweep_cmd, [str(REPO / "examples/sweeps/h200-glm46-throughput.yaml"), "--dry-run",
                                       "--render", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "sweep.json").read_text())
    assert len(doc["points"]) == 16 and doc["slo"]["max_p95_ttft_ms"] == 5000
    for p in doc["points"]:
        d = out / p["dir"]
        script = (d / "job.sh").read_text()
        assert "#SBATCH --nodes=8" in script and script.rstrip().endswith(f"-m aegis sweep-point {d}")
        subprocess.run(["bash", "-n", str(d / "job.sh")], check=True)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["models"][0]["tensor_parallel_size"] == 8
        assert json.loads((d / "point.json").read_text())["hash"] == p["hash"]
    agg = yaml.safe_load((out / next(p["dir"] for p in doc["points"] if p["label"] == "aggressive") / "config.yaml")
                         .read_text())["models"][0]
    assert agg["kv_cache_dtype"] == "fp8" and agg["num_redundant_experts"] == 32
    assert "--async-scheduling" in agg["extra_vllm_args"] and agg["extra_vllm_args"].count("--max-num-seqs") == 1


def test_render_needs_dry_run(tmp_path):
    r = CliRunner().invoke(sweep_cmd, [str(REPO / "examples/sweeps/local-tiny-4.yaml"), "--render", str(tmp_path)])
    assert r.exit_code != 0 and "--dry-run" in str(r.exception)
    assert list(tmp_path.iterdir()) == []


def test_apply_settings_engine_args_for_other_engines():
    raw = apply_settings({"model": "m", "engine": "sglang"}, {"mem_fraction_static": 0.8}, "x")
    assert raw["extra_args"] == ["--mem-fraction-static", "0.8"]
    raw = apply_settings({"model": "m", "extra_vllm_args": ["--max-num-seqs=8", "--x"]}, {"--max-num-seqs": 16}, "x")
    assert raw["extra_vllm_args"] == ["--x", "--max-num-seqs", "16"]
