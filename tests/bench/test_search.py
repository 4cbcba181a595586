"""`aegis probe --search`: the SLO grammar it takes, the percentile interval, the judge and the search itself."""
import math

import numpy as np
import pytest

from aegis.bench import quantile, search
from aegis.bench.slo import parse_run_slo, parse_search
from aegis.errors import UsageError
from tests.bench.conftest import aegis
from tests.bench.test_metrics import rec

# -- the SLO spec ----------------------------------------------------------------------------------


def test_percentile_shorthand_is_the_canonical_limit():
    assert parse_search("ttft_p99=500,itl_p99=50ms") == {"max_p99_ttft_ms": 500.0, "max_p99_itl_ms": 50.0}
    assert parse_search("max_p95_e2el_ms=9000, tpot_median=20") == {"max_p95_e2el_ms": 9000.0,
                                                                    "max_median_tpot_ms": 20.0}
    assert parse_run_slo("ttft_p95=2000,min_success_pct=99") == {"max_p95_ttft_ms": 2000.0, "min_success_pct": 99.0}


@pytest.mark.parametrize("text,says", [
    ("foo_p99=1", "use METRIC_STAT=MS"),
    ("ttft_p98=1", "unknown metric 'p98_ttft_ms'"),
    ("max_p99_foo_ms=1", "unknown metric 'p99_foo_ms'"),
    ("ttft_p99=abc", "'abc' is not a number"),
    ("ttft_p99=nan", "'nan' is not a number"),
    ("ttft_p99=-5", "must be a positive number"),
    ("ttft=500", "limits each request (goodput)"),
    ("ttft_mean=30", "limit a percentile"),
    ("min_p99_ttft_ms=3", "upper bounds"),
    ("", "give at least one limit"),
])
def test_bad_search_slo_is_one_line(text, says):
    with pytest.raises(UsageError) as err:
        parse_search(text)
    assert str(err.value).startswith("--slo ") and says in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_bad_search_input_in_one_line():
    for args, says in ((["--search", "--slo", "ttft_p99=5x"], "'5x' is not a number"),
                       (["--search"], "give at least one limit"),
                       (["--search", "--rates", "1,2", "--slo", "ttft_p99=5"], "not both"),
                       ([], "give --rates"),
                       (["--search", "--slo", "ttft_p99=5", "--search-start", "1", "--duration", "2"],
                        "needs at least 10")):
        p = aegis("probe", "--url", "http://127.0.0.1:9", "--model", "m", *args, check=False)
        assert p.returncode == 2 and says in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


# -- the percentile's interval ---------------------------------------------------------------------


def test_binomial_cdf_is_the_sum_of_the_pmf():
    for n, q, k in ((30, 0.3, 7), (200, 0.99, 195), (5, 0.5, 0)):
        exact = sum(math.comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(k + 1))
        assert quantile.binom_cdf(k, n, q) == pytest.approx(exact, rel=1e-9)


def _ranks_by_definition(n, q, confidence):
    """The largest l with P(B <= l-1) <= a/2 and the smallest u with P(B <= u-1) >= 1-a/2, from summed pmfs."""
    cdf, total = [], 0.0
    for i in range(n + 1):
        total += math.comb(n, i) * q ** i * (1 - q) ** (n - i)
        cdf.append(total)
    F = lambda k: 0.0 if k < 0 else (1.0 if k >= n else cdf[k])  # noqa: E731
    a = 1 - confidence
    return (max(L for L in range(n + 1) if F(L - 1) <= a / 2), min(U for U in range(1, n + 2) if F(U - 1) >= 1 - a / 2))


def test_ranks_match_the_published_table_and_the_p99_bound():
    for n, q in ((1000, 0.99), (50, 0.9), (7, 0.5), (400, 0.95)):
        assert quantile.ranks(n, q, 0.95) == _ranks_by_definition(n, q, 0.95)
    # The 95 % distribution-free interval of the median: x_(40)..x_(61) for n = 100, x_(2)..x_(9) for n = 10
    # (the standard tables, e.g. Conover, Practical Nonparametric Statistics, table A3).
    assert quantile.ranks(100, 0.5, 0.95) == (40, 61)
    assert quantile.ranks(10, 0.5, 0.95) == (2, 9)
    # An upper bound on p99 needs P(all n below it) = 0.99^n <= 2.5 %: n >= 368 (0.99^367 = 0.02507).
    assert quantile.ranks(367, 0.99, 0.95)[1] == 368 and quantile.interval(list(range(367)), 0.99, 0.95)[1] is None
    assert quantile.ranks(368, 0.99, 0.95)[1] == 368 and quantile.interval(list(range(368)), 0.99, 0.95)[1] == 367


def test_interval_covers_the_true_quantile_at_least_as_often_as_promised():
    rng = np.random.default_rng(7)
    for n, q in ((50, 0.9), (400, 0.99), (31, 0.5)):
        truth = q  # of the uniform distribution on [0, 1]
        hits = 0
        for _ in range(2000):
            lo, hi = quantile.interval(list(rng.random(n)), q, 0.95)
            hits += (lo is None or lo <= truth) and (hi is None or truth <= hi)
        assert 0.95 - 0.012 <= hits / 2000 <= 0.995, (n, q, hits)  # 0.012: ~2.5 binomial sd of 2000 trials


# -- judging one rate ------------------------------------------------------------------------------


def _records(ttfts, failed=0):
    rs = [rec(i, t, t + 40.0, 5, itl=[10.0] * 4) for i, t in enumerate(ttfts)]
    return rs + [rec(len(rs) + i, None, 5.0, 0, ok=False, kind="timeout") for i in range(failed)]


def test_judge_decides_by_interval_then_margin_else_unclear():
    ttfts = [float(x) for x in range(1, 1001)]  # p99 (numpy's linear) = 990.01; 95 % interval x_(983)..x_(997)
    lims = search.limits(parse_search("ttft_p99=1000"))
    j = search.judge(_records(ttfts), lims, margin=0.1, confidence=0.95)
    c = j["checks"][0]
    assert c["value"] == pytest.approx(990.01) and (c["ci_low"], c["ci_high"]) == (983.0, 997.0)
    assert j["verdict"] == search.PASS  # the whole interval is under 1000
    assert search.judge(_records(ttfts), search.limits({"max_p99_ttft_ms": 980.0}), 0.1, 0.95)["verdict"] == "fail"
    # 990 is inside the interval and within 10 % of the limit: unclear; the estimate settles it.
    j = search.judge(_records(ttfts), search.limits({"max_p99_ttft_ms": 990.0}), 0.1, 0.95)
    assert j["verdict"] == search.UNCLEAR and search.settle(j) is False
    # Too few values for an upper bound on p99 (n < 368): the margin decides far from the limit.
    few = _records([10.0] * 50)
    assert search.judge(few, search.limits({"max_p99_ttft_ms": 100.0}), 0.1, 0.95)["verdict"] == search.PASS
    assert search.judge(few, search.limits({"max_p99_ttft_ms": 10.5}), 0.1, 0.95)["verdict"] == search.UNCLEAR
    # More than 1 % failed requests fail the rate whatever the latencies (probe's TOO HIGH).
    j = search.judge(_records([10.0] * 98, failed=2), search.limits({"max_p99_ttft_ms": 100.0}), 0.1, 0.95)
    assert j["verdict"] == search.FAIL and j["overloaded"]


# -- the search over a known truth -----------------------------------------------------------------


def _oracle(knee, client_from=None, tried=None):
    def measure(rate):
        if tried is not None:
            tried.append(rate)
        return search.Verdict(rate <= knee, client_limited=client_from is not None and rate >= client_from)
    return measure


@pytest.mark.parametrize("start", [0.5, 13.7, 100.0])
def test_search_brackets_then_bisects_to_the_tolerance(start):
    out = search.find(_oracle(13.7), start=start, tolerance=0.05, max_rate=1e6, min_rate=0.01, max_points=50)
    assert out.stop == "converged" and out.low <= 13.7 < out.high and out.high / out.low - 1 <= 0.05


def test_search_stops_and_says_why():
    tried: list[float] = []
    out = search.find(_oracle(1e9, client_from=8, tried=tried), 1, 0.05, 1e6, 0.01, 50)
    assert (out.stop, out.low, tried) == ("client-limited", 8, [1, 2, 4, 8])
    assert search.find(_oracle(1e9), 1, 0.05, 20, 0.01, 50).stop == "max-rate"
    out = search.find(_oracle(0.001), 1, 0.05, 1e6, 0.1, 50)
    assert (out.stop, out.low, out.high) == ("min-rate", None, 0.125)
    out = search.find(_oracle(13.7), 1, 0.001, 1e6, 0.01, 6)
    assert out.stop == "max-points" and out.points == 6 and out.low <= 13.7 < out.high
