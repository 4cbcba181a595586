"""aegis size: fleet arithmetic and the memory fit, checked on hand-computed cases."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from aegis.plan.cli import size_cmd
from aegis.plan.size import fit_tp, instances_needed, nodes_for


def run(*args):
    return CliRunner().invoke(size_cmd, list(args))


def test_instances_hand_computed():
    assert instances_needed(1e9, 2500, 10) == 12  # 1e9 / 9e7 = 11.1
    assert instances_needed(9e7, 2500, 10) == 1  # exactly one instance-deadline
    assert nodes_for(12, 4, 8) == 6 and nodes_for(3, 16, 8) == 6 and nodes_for(13, 1, 12) == 2


def test_fleet_cli_with_site():
    r = run("--tokens", "1e9", "--deadline", "10", "--throughput", "2500", "--site", "h200", "--tp", "4", "--json")
    out = json.loads(r.output)
    assert out["instances"] == 12 and out["nodes"] == 6
    assert out["hours_with_instances"] == pytest.approx(1e9 / (2500 * 3600 * 12))
    assert out["margin_pct"] == pytest.approx(100 * (10 - out["hours_with_instances"]) / 10)


def test_fleet_from_bench_summary(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"output_throughput": 1000.0, "endpoints": ["a", "b"]}))
    out = json.loads(run("--tokens", "3.6e7", "--deadline", "1", "--throughput", str(tmp_path), "--json").output)
    assert out["tokens_per_s_per_instance"] == 500 and out["instances"] == 20


def test_memory_fit_hand_computed():
    # Llama-3-70B shape: 80 layers, 8 KV heads x 128, bf16: KV 2*80*8*128*2 = 327680 B/token
    r = fit_tp(70e9, "bf16", 32768, 64.0, 12, layers=80, kv_heads=8, head_dim=128)
    assert r["kv_bytes_per_token"] == 327680
    # TP 2: 70 + 5.37 GB + 2 = 77.4 > 57.6; TP 4: 35 + 2.68 + 2 = 39.7 <= 57.6
    assert r["tensor_parallel_size"] == 4 and r["per_device_gb"] == pytest.approx(35 + 327680 * 32768 / 4e9 + 2)
    r = fit_tp(8e9, "bf16", 8192, 141.0, 8, layers=32)
    assert r["tensor_parallel_size"] == 1


@pytest.mark.parametrize("args, msg", [
    (["--tokens", "1e9"], "needs all of --tokens, --deadline and --throughput"),
    (["--tokens", "1e9", "--deadline", "0", "--throughput", "5"], "must be positive"),
    (["--tokens", "1e9", "--deadline", "1", "--throughput", "nope"], "neither a number nor an existing file"),
    (["--model-params", "70e9", "--max-model-len", "1000"], "device memory unknown"),
    (["--model-params", "70e9", "--max-model-len", "1000", "--device-memory-gb", "80", "--dtype", "fp7"],
     "unknown dtype 'fp7'"),
    (["--model-params", "1e15", "--max-model-len", "1000", "--site", "polaris"], "do not fit"),
    ([], "give either"),
])
def test_impossible_inputs_one_line(args, msg):
    r = run(*args)
    assert r.exit_code != 0 and msg in str(r.exception) and "\n" not in str(r.exception)
