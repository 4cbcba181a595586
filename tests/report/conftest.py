"""Small real result directories made once per session with the simulated server (a sweep layout)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from aegis.bench.cli import bench_cmd, probe_cmd
from aegis.launch.endpoints import EndpointsFile, InstanceEndpoint
from aegis.testing.simserver import SimProcess

LOAD = ["--input-len", "32", "--output-len", "8", "--scrape-interval", "0.2", "--no-progress"]


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    """sweep/<label>-<hash>/bench for two sim configurations, one point with no results, and a probe dir."""
    root = tmp_path_factory.mktemp("results")
    sweep = root / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"slo": {"max_p95_ttft_ms": 2000, "min_success_pct": 99}}))
    for label, digest, flags in (("fast", "aaaa1111", ["--max-num-seqs", "32"]),
                                 ("faulty", "bbbb2222", ["--max-num-seqs", "32", "--fail-every", "4"])):
        point = sweep / f"{label}-{digest}"
        point.mkdir()
        (point / "point.json").write_text(json.dumps({"label": label, "hash": digest, "devices": 2}))
        if label == "fast":  # the point's servers, as the head wrote them: startup phases per instance
            EndpointsFile(instances=[
                InstanceEndpoint(name=f"i{n}", url=f"http://h:{8000 + n}", phases={
                    "staged": 1.0, "started": 2.0 + n, "loaded": 30.0 + n, "ready": ready})
                for n, ready in enumerate((41.5, 57.25))]).write(point / "endpoints.json")
        with SimProcess(*flags) as s:
            r = CliRunner().invoke(bench_cmd, ["--url", s.url, "--rate", "20", "--num-requests", "24",
                                               "--output-dir", str(point / "bench"), *LOAD])
            assert r.exit_code == 0, r.output
    oom = sweep / "oom-cccc3333"
    oom.mkdir()
    (oom / "point.json").write_text(json.dumps({"label": "oom", "hash": "cccc3333", "devices": 2}))
    (oom / "job.out").write_text("...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate\n")
    with SimProcess("--max-num-seqs", "4") as s:
        r = CliRunner().invoke(probe_cmd, ["--url", s.url, "--rates", "5,15", "--duration", "1",
                                           "--output-dir", str(root / "probe"), *LOAD])
        assert r.exit_code == 0, r.output
    return root
