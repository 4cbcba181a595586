"""Arrival schedules, checked on the schedule itself (not on wall time)."""
import numpy as np
import pytest

from aegis.bench.arrival import ArrivalSpec, load_trace, schedule
from aegis.errors import UsageError


def gaps(spec, n=20000):
    return np.diff(schedule(spec, n))


def test_poisson_gaps_are_exponential_with_the_rate():
    g = gaps(ArrivalSpec("poisson", rate=8.0, seed=1))
    assert g.mean() == pytest.approx(1 / 8, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)       # exponential: CV 1
    # P(gap > mean) = e^-1 for an exponential distribution
    assert (g > 1 / 8).mean() == pytest.approx(np.exp(-1), abs=0.015)


@pytest.mark.parametrize("k", [0.25, 4.0])
def test_gamma_burstiness_sets_the_coefficient_of_variation(k):
    g = gaps(ArrivalSpec("gamma", rate=5.0, burstiness=k, seed=2))
    assert g.mean() == pytest.approx(1 / 5, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(1 / np.sqrt(k), rel=0.06)


def test_constant_rate_is_exact():
    t = schedule(ArrivalSpec("constant", rate=4.0), 9)
    assert np.allclose(t, np.arange(9) / 4.0)


def test_same_seed_same_schedule_other_seed_differs():
    a = schedule(ArrivalSpec("poisson", rate=3.0, seed=7), 500)
    b = schedule(ArrivalSpec("poisson", rate=3.0, seed=7), 500)
    c = schedule(ArrivalSpec("poisson", rate=3.0, seed=8), 500)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_duration_gives_the_count_that_fits_at_the_rate():
    spec = ArrivalSpec("gamma", rate=50.0, burstiness=0.5, seed=3)
    by_time = schedule(spec, None, duration=200.0)
    assert len(by_time) == 50 * 200                      # offsets k/R < 200 for k = 0 .. 9999
    assert np.array_equal(by_time, schedule(spec, len(by_time)))
    assert by_time[-1] < 200.0 and by_time[0] == 0.0 and np.all(np.diff(by_time) >= 0)
    # a count cut by a shorter duration
    both = schedule(spec, 10000, duration=100.0)
    assert np.array_equal(both, by_time[by_time < 100.0])


@pytest.mark.parametrize("process", ["poisson", "constant", "gamma"])
@pytest.mark.parametrize("n", [2, 3, 17, 100, 1001])
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_the_mean_gap_is_exactly_one_over_the_rate(process, n, seed):
    """The issue's case: --arrival poisson --rate 4 --num-requests 100 offered 3.37 req/s (seed 0)."""
    rate = 4.0
    t = schedule(ArrivalSpec(process, rate=rate, burstiness=0.5 if process == "gamma" else 1.0, seed=seed), n)
    assert len(t) == n and t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert np.diff(t).mean() == pytest.approx(1 / rate, rel=1e-12)
    assert (n - 1) / (t[-1] - t[0]) == pytest.approx(rate, rel=1e-12)


def test_a_single_request_goes_at_zero():
    assert list(schedule(ArrivalSpec("poisson", rate=4.0), 1)) == [0.0]
    assert list(schedule(ArrivalSpec("poisson", rate=4.0), None, duration=0.1)) == [0.0]


def test_trace_is_sorted_and_shifted_to_zero(tmp_path):
    f = tmp_path / "trace.txt"
    f.write_text("# seconds\n10.5\n10.0\n{\"timestamp\": 12.25}\n11\n")
    spec = ArrivalSpec("trace", trace=load_trace(str(f)))
    assert list(schedule(spec)) == [0.0, 0.5, 1.0, 2.25]
    assert list(schedule(spec, duration=1.0)) == [0.0, 0.5]


@pytest.mark.parametrize("spec,msg", [
    (ArrivalSpec("poisson", rate=-1.0), "--rate"),
    (ArrivalSpec("gamma", rate=1.0, burstiness=0.0), "--burstiness"),
    (ArrivalSpec("weibull", rate=1.0), "unknown arrival process"),
    (ArrivalSpec("trace"), "--trace"),
])
def test_bad_specs_are_usage_errors(spec, msg):
    with pytest.raises(UsageError, match=msg):
        schedule(spec, 10)


def test_bad_trace_line_names_the_line(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("1\nsoon\n")
    with pytest.raises(UsageError, match="line 2"):
        load_trace(str(f))
