"""`aegis report` ranks `vllm bench serve --save-result` files next to aegis runs (files made by vLLM's client)."""
import json
import math
from pathlib import Path

from click.testing import CliRunner

from aegis.bench import metrics
from aegis.report.cli import report_cmd
from aegis.report.collect import collect
from tests.bench.test_metrics import rec

DATA = Path(__file__).parent / "data" / "vllm-bench-serve"
SINGLE = DATA / "openai-5.0qps-sim-model-20261204-165133.json"
APPENDED = DATA / "appended.json"
VLLM_ONLY = {"max_output_tokens_per_s", "rtfx", "burstiness", "num_prompts", "max_concurrency"}


def _results() -> list[dict]:
    return [json.loads(SINGLE.read_text())] + [json.loads(line) for line in APPENDED.read_text().splitlines()]


def test_vllm_keys_are_aegis_summary_keys():
    """What the report maps one to one: every number vLLM saved is a key of aegis's summary (or vLLM's own)."""
    ours = set(metrics.compute([rec(0, 10.0, 50.0, 5, itl=[10.0] * 4)], slo={"ttft": 100.0})) | {"request_rate"}
    for r in _results():
        numbers = {k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert numbers - VLLM_ONLY <= ours, numbers - VLLM_ONLY - ours


def test_collect_reads_every_result_with_its_own_numbers():
    runs = collect([DATA])
    assert [r.config for r in runs] == ["appended#1", "appended#2", SINGLE.stem]
    by_name = {r.config: r for r in runs}
    for run, r in zip([by_name[SINGLE.stem], by_name["appended#1"], by_name["appended#2"]], _results()):
        assert run.kind == "vllm" and run.rate == r["request_rate"] and run.path.endswith(".json")
        for key, value in r.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                assert run.metrics[key] == value, key
        assert run.metrics["success_pct"] == 100.0 * r["completed"] / (r["completed"] + r["failed"])
        assert "dispatch_lag_p99_ms" not in run.metrics and "client_bound" not in run.metrics  # not measured
    assert by_name["appended#1"].metrics["p95_ttft_ms"] == _results()[1]["p95_ttft_ms"]


def test_report_ranks_vllm_and_aegis_runs_together(results, tmp_path):
    out = tmp_path / "rep"
    r = CliRunner().invoke(report_cmd, [str(results / "sweep" / "fast-aaaa1111"), str(SINGLE), str(APPENDED),
                                        "-o", str(out), "--no-plots", "--slo", "ttft_p99=1000"])
    assert r.exit_code == 0, r.output
    rows = (out / "summary.csv").read_text().splitlines()
    kinds = [row.split(",")[3] for row in rows[1:]]
    assert sorted(kinds) == ["bench", "vllm", "vllm", "vllm"]
    assert f"{SINGLE.stem}@5" in (out / "report.md").read_text()


def test_files_that_are_not_vllm_results(tmp_path):
    (tmp_path / "other.json").write_text('{"date": "x", "note": "no results"}')
    r = CliRunner().invoke(report_cmd, [str(tmp_path), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no results found" in str(r.exception)
    r = CliRunner().invoke(report_cmd, [str(tmp_path / "other.json"), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "holds no `vllm bench serve --save-result` result" in str(r.exception)
    (tmp_path / "notes.txt").write_text("hello")
    r = CliRunner().invoke(report_cmd, [str(tmp_path / "notes.txt"), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "neither a directory nor a `vllm bench serve --save-result` file" in str(r.exception)
