"""`aegis probe --search` against simulated servers whose capacity follows from their flags: one URL, a fleet."""
import json

import pytest

from tests.bench.conftest import aegis, get_json

pytestmark = pytest.mark.slow

SEQS, DECODE_MS, OUT_LEN = 4, 40.0, 5
SIM_FLAGS = ("--max-num-seqs", str(SEQS), "--decode-ms", str(DECODE_MS), "--decode-ms-per-seq", "0",
             "--prefill-ms-per-token", "0")
# A request holds one of --max-num-seqs slots for --output-len engine steps of --decode-ms (its first token
# comes out of its prefill step; per-sequence and prefill costs are 0 here), and a freed slot is refilled at
# the next step. So one server completes at most
#     capacity = max-num-seqs / (output-len x decode-ms) = 4 / (5 x 0.040 s) = 20 requests/s.
# Below it, constant arrivals never queue: TTFT is at most two steps (the step under way, then the prefill
# step), 80 ms; above it the queue grows for the whole run. The SLO's 200 ms (five steps) sits between.
CAPACITY = SEQS / (OUT_LEN * DECODE_MS / 1000.0)
SEARCH = ("--search", "--slo", "ttft_p99=200,itl_p99=200", "--tolerance", "0.05", "--duration", "2.5",
          "--arrival", "constant", "--input-len", "16", "--output-len", str(OUT_LEN), "--no-scrape", "--no-progress")


def _found(out) -> dict:
    doc = json.loads((out / "search.json").read_text())
    assert doc["status"] == "complete" and doc["stop"] == "converged", doc["stop_reason"]
    assert doc["bracket"]["high"] / doc["bracket"]["low"] - 1 <= 0.05
    return doc


def test_search_finds_the_knee_of_one_server(make_sim, tmp_path):
    s = make_sim(*SIM_FLAGS)
    out = tmp_path / "search"
    p = aegis("probe", "--url", s.url, *SEARCH, "--search-start", "6", "--output-dir", str(out), timeout=170)
    doc = _found(out)
    rate = doc["found"]["rate"]
    assert abs(rate - CAPACITY) / CAPACITY <= 0.10, (rate, CAPACITY, p.stdout)
    assert f"Highest rate meeting the SLO: {rate:g} req/s" in p.stdout
    # Every rate tried has its runs on disk, and a rate 20 % over capacity failed on TTFT.
    over = [pt for pt in doc["points"] if pt["rate"] >= 1.2 * CAPACITY]
    assert over and all(pt["verdict"] == "fail" for pt in over)
    for pt in doc["points"]:
        assert all((out / r["dir"] / "summary.json").is_file() for r in pt["runs"])
    header = (out / "search.csv").read_text().splitlines()[0]
    assert header.startswith("rate,verdict,marginal,runs") and "p99_ttft_ms_ci_high" in header


def test_search_over_a_fleet_finds_its_summed_knee_and_feeds_size(make_sim, tmp_path):
    sims = [make_sim(*SIM_FLAGS) for _ in range(2)]
    ep = {"job_id": "1", "run_dir": str(tmp_path), "api_key_file": None,
          "instances": [{"name": f"i{n}", "model": "sim-model", "url": s.url, "status": "ready"}
                        for n, s in enumerate(sims)]}
    (tmp_path / "endpoints.json").write_text(json.dumps(ep))
    out = tmp_path / "search"
    aegis("probe", "--endpoints", str(tmp_path), *SEARCH, "--search-start", "12", "--output-dir", str(out),
          timeout=170)
    doc = _found(out)
    rate = doc["found"]["rate"]
    assert abs(rate - 2 * CAPACITY) / (2 * CAPACITY) <= 0.10, (rate, 2 * CAPACITY)
    served = [len(get_json(s.url + "/sim/truth")) for s in sims]
    assert abs(served[0] - served[1]) <= 2, served  # round-robin: both servers took half
    # aegis size reads the rate found: its output tokens/s, per endpoint.
    size = json.loads(aegis("size", "--tokens", "1e6", "--deadline", "1", "--throughput", str(out),
                            "--json").stdout)
    assert size["tokens_per_s_per_instance"] == pytest.approx(doc["found"]["output_throughput"] / 2)
    assert size["tokens_per_s_per_instance"] <= CAPACITY * OUT_LEN
    # aegis report lists every run of the search as a probe run at its rate.
    aegis("report", str(out), "-o", str(tmp_path / "rep"), "--no-plots")
    rows = (tmp_path / "rep" / "summary.csv").read_text().splitlines()[1:]
    assert sorted(float(r.split(",")[4]) for r in rows) == sorted(
        pt["rate"] for pt in doc["points"] for _ in pt["runs"])
    assert {r.split(",")[3] for r in rows} == {"probe"}


def test_search_through_the_gateway_finds_the_fleets_knee(make_sim, tmp_path):
    """Issue 19: the capacity search works through `aegis gateway` (one URL over both servers)."""
    from tests.fixtures.gateway import GatewayProc

    sims = [make_sim(*SIM_FLAGS) for _ in range(2)]
    (tmp_path / "endpoints.json").write_text(json.dumps({"instances": [
        {"name": f"i{n}", "model": "sim-model", "url": s.url, "status": "ready"} for n, s in enumerate(sims)]}))
    gw = GatewayProc(tmp_path, str(tmp_path), "--key-file", str(tmp_path / "gw.key"), "--policy", "round_robin",
                     "--host", "127.0.0.1")
    try:
        out = tmp_path / "search"
        aegis("probe", "--url", gw.url, "--api-key-file", str(tmp_path / "gw.key"), *SEARCH, "--search-start", "12",
              "--output-dir", str(out), timeout=170)
        rate = _found(out)["found"]["rate"]
        assert abs(rate - 2 * CAPACITY) / (2 * CAPACITY) <= 0.10, (rate, 2 * CAPACITY)
    finally:
        gw.stop()
