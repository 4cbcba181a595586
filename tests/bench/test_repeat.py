"""`aegis bench --repeat K`: the Student-t interval against its definition, and K runs against the sim."""
import json
import math

import numpy as np
import pytest

from aegis.bench.repeat import interval, t_cdf, t_quantile
from tests.bench.conftest import aegis


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 200])
def test_t_cdf_is_the_integral_of_the_density(df):
    for t in (-3.0, -0.5, 0.0, 1.0, 2.5):
        lo = -2000.0 if df < 3 else -60.0       # the mass left of lo: < 2e-4 (df 1), < 1e-9 (df >= 3)
        x = np.concatenate([np.linspace(lo, -10.0, 200001), np.linspace(-10.0, t, 200001)[1:]]) if t > -10 \
            else np.linspace(lo, t, 400001)
        y = np.exp(np.array([math.lgamma((df + 1) / 2) - math.lgamma(df / 2)])) / math.sqrt(df * math.pi) \
            * (1 + x * x / df) ** (-(df + 1) / 2)
        assert t_cdf(t, df) == pytest.approx(np.trapezoid(y, x), abs=2e-4 if df < 3 else 1e-6)


@pytest.mark.parametrize("df,value", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452),
                                      (1000, 1.9623)])
def test_the_975_quantile_matches_the_tables(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-12)


def test_interval_of_the_mean():
    v = [10.0, 12.0, 11.0, 13.0]
    r = interval(v)
    s = float(np.std(v, ddof=1))
    assert r["mean"] == 11.5 and r["std"] == pytest.approx(s)
    assert r["ci_half_width"] == pytest.approx(3.1824 * s / 2, rel=1e-4)   # t(0.975, 3) = 3.1824
    assert interval([5.0])["ci_half_width"] is None


def test_bench_repeat_runs_k_times_and_summarizes(sim, tmp_path):
    out = tmp_path / "rep"
    p = aegis("bench", "--url", sim.url, "--rate", "40", "--num-requests", "12", "--input-len", "16",
              "--output-len", "4", "--no-progress", "--repeat", "3", "--output-dir", str(out))
    runs = [json.loads((out / f"repeat-{i}" / "summary.json").read_text()) for i in (1, 2, 3)]
    rep = json.loads((out / "repeat.json").read_text())
    assert rep["repeats"] == 3 and all(r["completed"] == 12 for r in runs)
    for key in ("request_throughput", "median_ttft_ms", "p99_e2el_ms"):
        vals = [r[key] for r in runs]
        m = rep["metrics"][key]
        assert m["values"] == vals and m["mean"] == pytest.approx(np.mean(vals))
        half = 4.3027 * np.std(vals, ddof=1) / math.sqrt(3)          # t(0.975, 2 degrees of freedom)
        assert m["ci_low"] == pytest.approx(np.mean(vals) - half, rel=1e-4)
        assert m["ci_high"] == pytest.approx(np.mean(vals) + half, rel=1e-4)
    assert "3 repeats: mean, 95% CI (Student t)" in p.stdout and "median_ttft_ms:" in p.stdout


def test_repeat_with_resume_is_one_line():
    p = aegis("bench", "--resume", "--repeat", "2", "--output-dir", "x", check=False)
    assert p.returncode == 2 and "--repeat" in p.stderr and len(p.stderr.strip().splitlines()) == 1
