"""aegis report over real (simulated-server) bench, probe and sweep directories: CSV values, ranking, plots."""
from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from aegis.bench.slo import parse_run_slo
from aegis.errors import UsageError
from aegis.report.analyze import pareto_front
from aegis.report.cli import report_cmd


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    r = CliRunner().invoke(report_cmd, [str(results / "sweep"), str(results / "probe"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_long_csv_matches_per_request_data(results, report):
    long = rows(report / "results_long.csv")
    reqs = [json.loads(x) for x in (results / "sweep/fast-aaaa1111/bench/requests.jsonl").read_text().splitlines()]
    fast = {r["metric"]: float(r["value"]) for r in long if r["config"] == "fast"}
    assert fast["completed"] == sum(r["success"] for r in reqs) == 24
    assert fast["total_output_tokens"] == sum(r["output_tokens"] for r in reqs if r["success"])
    assert fast["output_throughput_per_device"] == pytest.approx(fast["output_throughput"] / 2)
    ttfts = sorted(r["ttft_ms"] for r in reqs)
    assert fast["median_ttft_ms"] == pytest.approx((ttfts[11] + ttfts[12]) / 2, rel=1e-6)
    assert {r["config_hash"] for r in long if r["config"] == "fast"} == {"aaaa1111"}
    assert {r["rate"] for r in long if r["kind"] == "probe"} == {"5", "15"}


def test_ranking_slo_and_reasons(report):
    summary = rows(report / "summary.csv")
    by = {(r["config"], r["rate"]): r for r in summary}
    assert by[("faulty", "")]["passed"] == "0" and "failed requests (http_500" in by[("faulty", "")]["reasons"]
    assert "SLO success_pct" in by[("faulty", "")]["reasons"]
    assert by[("oom", "")]["passed"] == "0" and "out of memory" in by[("oom", "")]["reasons"]
    passing = [r for r in summary if r["passed"] == "1"]
    assert passing and summary[: len(passing)] == passing  # passing first
    tps = [float(r["output_throughput"]) for r in passing]
    assert tps == sorted(tps, reverse=True)
    md = (report / "report.md").read_text()
    assert "SLO: p95_ttft_ms <= 2000, success_pct >= 99" in md and f"Best: {passing[0]['config']}" in md
    assert "**oom**: out of memory" in md
    assert "<table>" in (report / "report.html").read_text()


def test_pngs_exist_and_are_real_images(report):
    from matplotlib import image
    for name in ("throughput_vs_latency", "ttft_vs_rate", "pareto", "prometheus"):
        path = report / f"{name}.png"
        assert path.stat().st_size > 10_000, name
        img = image.imread(str(path))
        assert img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05, f"{name} looks blank"


def test_errors(tmp_path):
    r = CliRunner().invoke(report_cmd, [str(tmp_path), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no results found" in str(r.exception)
    with pytest.raises(UsageError, match="max_METRIC=VALUE"):
        parse_run_slo("p95=3")


def test_pareto_front():
    pts = [(1, 10), (2, 8), (3, 3), (1.5, 5), (2, 9)]
    assert pareto_front(pts) == [0, 4, 2]


def test_startup_phases_of_a_points_servers(report):
    """A sweep point's endpoints.json gives its slowest instance's startup phases (seconds from job start)."""
    long = rows(report / "results_long.csv")
    fast = {r["metric"]: r["value"] for r in long if r["config"] == "fast"}
    assert (fast["startup_staged_s"], fast["startup_started_s"], fast["startup_loaded_s"],
            fast["startup_ready_s"]) == ("1.0", "3.0", "31.0", "57.25")
    assert not any(r["metric"].startswith("startup_") for r in long if r["config"] == "faulty")  # none recorded
    md = (report / "report.md").read_text()
    assert "| ready s |" in md
    fast_row = next(line for line in md.splitlines() if "| fast |" in line)
    assert fast_row.rstrip(" |").endswith("57")
