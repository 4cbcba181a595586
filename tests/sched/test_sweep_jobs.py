"""`aegis sweep` on the real 3-node Slurm cluster with the CPU vLLM: one job per configuration, and inline
inside an interactive allocation."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.fixtures.vllm import BASE_ARGS, BASE_ENV
from tests.sched.test_slurm_jobs import SITES, aegis

pytestmark = pytest.mark.slow
SITE = ["--site-file", SITES / "testcluster-cpu.yaml", "--site", "testcluster-cpu"]


def write_spec(tmp_path, base, **extra):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "jobs", "base": {"walltime": "00:30:00", **base},
                                    "bench": {"input_len": 16, "output_len": 4, "rate": 4, "num_requests": 8},
                                    **extra}))
    return spec


def statuses(d):
    return {f.parent.name: json.loads(f.read_text()) for f in d.glob("*/status.json")}


def test_one_job_per_configuration_submitted_then_collected(slurm_cluster, tmp_path, vllm_env):
    spec = write_spec(tmp_path, {"model": str(vllm_env.model_dir), "name": "tiny",
                                 "engine_python": str(vllm_env.python),
                                 "env": {**BASE_ENV, "VLLM_SERVER_DEV_MODE": "1"}, "extra_vllm_args": list(BASE_ARGS),
                                 "startup_timeout": 900, "directives": ["--exclusive"]},  # a node per point
                      axes={"max_num_seqs": [4, 8]}, warmup={"num_requests": 2})
    d = tmp_path / "sweep"
    # Outside an allocation the default mode is one job per point; --no-wait submits and returns.
    r = aegis(slurm_cluster, "sweep", spec, *SITE, "--dir", d, "--no-wait", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mode jobs" in r.stderr and r.stderr.count("submitted job") == 2
    submitted = statuses(d)
    assert len(submitted) == 2 and all(s["state"] in ("submitted", "running", "done") for s in submitted.values())
    job_ids = {name: (d / name / "job_id").read_text().strip() for name in submitted}
    # --resume waits for the jobs already submitted instead of submitting them again.
    r = aegis(slurm_cluster, "sweep", spec, *SITE, "--dir", d, "--resume", cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr + "".join(
        p.read_text() for p in d.glob("*/slurm-*.out"))
    assert "submitted job" not in r.stderr
    st = statuses(d)
    assert all(s["state"] == "done" for s in st.values())
    for name, s in st.items():
        job_id = (d / name / "job_id").read_text().strip()
        assert s["job_id"] == job_id == job_ids[name]  # ran inside the job submitted first
        assert s["host"] in ("node1", "node2", "node3")
        assert not (d / name / "attempts").exists()  # the job's submission record is not an earlier attempt
        assert (d / name / f"slurm-{job_id}.out").exists()
        assert (d / name / "job.sh").read_text().rstrip().endswith(f"sweep-point {d / name}")
        summary = json.loads((d / name / "bench" / "summary.json").read_text())
        assert summary["completed"] == 8 and summary["failed"] == 0
        assert s["prefix_cache_reset"] == [{"before": "bench", "result": "reset"}]
    assert len({s["host"] for s in st.values()}) == 2  # exclusive nodes: the points ran side by side
    assert (d / "report" / "summary.csv").exists()
    status = json.loads(aegis(slurm_cluster, "status", d / name, "--json").stdout)
    assert status["state"] == "completed"


def test_cancel_stops_the_sweeps_jobs(slurm_cluster, tmp_path, sleeper):
    spec = write_spec(tmp_path, {"model": "org/model", "engine_python": str(sleeper), "startup_timeout": 600},
                      axes={"max_num_seqs": [4, 8, 16]}, run={"max_parallel": 2})
    d = tmp_path / "sweep"
    r = aegis(slurm_cluster, "sweep", spec, *SITE, "--dir", d, "--no-wait", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("submitted job") == 2 and "1 waiting for a free slot" in r.stderr
    r = aegis(slurm_cluster, "sweep", spec, *SITE, "--dir", d, "--cancel", cwd=tmp_path)
    assert r.returncode == 0 and "cancelled 2 job(s)" in r.stdout, r.stderr
    st = statuses(d)
    assert sorted(s["state"] for s in st.values()) == ["interrupted", "interrupted"]
    deadline = time.monotonic() + 60
    while True:
        q = aegis(slurm_cluster, "status", d / next(iter(st)), "--json")
        if json.loads(q.stdout)["state"] == "cancelled":
            break
        assert time.monotonic() < deadline, q.stdout
        time.sleep(1)


def test_inline_inside_an_interactive_allocation(slurm_cluster, tmp_path, vllm_env):
    """`salloc` then `aegis sweep`: the default mode is inline, points run in that allocation's nodes."""
    spec = write_spec(tmp_path, {"model": str(vllm_env.model_dir), "name": "tiny",
                                 "engine_python": str(vllm_env.python), "env": dict(BASE_ENV),
                                 "extra_vllm_args": list(BASE_ARGS), "startup_timeout": 900},
                      axes={"max_num_seqs": [4]}, warmup={"num_requests": 2})
    d = tmp_path / "sweep"
    r = subprocess.run(["salloc", "-N1", "-p", "debug", "--exclusive", sys.executable, "-m", "aegis", "sweep",
                        str(spec), *map(str, SITE), "--dir", str(d)], capture_output=True, text=True,
                       env={**os.environ, **slurm_cluster.env}, cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mode inline" in r.stderr and "submitted job" not in r.stderr
    (st,) = statuses(d).values()
    assert st["state"] == "done" and st["job_id"]  # the salloc allocation's job
    doc = json.loads((d / f"{st['label']}-{st['hash']}" / "endpoints.json").read_text())
    assert doc["scheduler"] == "slurm" and doc["instances"][0]["hostname"] in ("node1", "node2", "node3")
    # Without VLLM_SERVER_DEV_MODE vLLM has no reset endpoint: recorded, and the bench still ran.
    (reset,) = st["prefix_cache_reset"]
    assert reset["before"] == "bench" and reset["result"].startswith("unavailable (HTTP 404)"), reset
    assert "prefix cache not reset: unavailable" in r.stderr and st["steps"]["bench"]["exit_code"] == 0


def test_inline_submit_runs_every_point_in_one_job(slurm_cluster, tmp_path, vllm_env):
    spec = write_spec(tmp_path, {"model": str(vllm_env.model_dir), "name": "tiny",
                                 "engine_python": str(vllm_env.python), "env": dict(BASE_ENV),
                                 "extra_vllm_args": list(BASE_ARGS), "startup_timeout": 900,
                                 "walltime": "00:10:00"},
                      axes={"max_num_seqs": [4, 8]})
    d = tmp_path / "sweep"
    r = aegis(slurm_cluster, "sweep", spec, *SITE, "--mode", "inline", "--submit", "--dir", d, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = (d / "inline-job" / "job_id").read_text().strip()
    script = (d / "inline-job" / "job.sh").read_text()
    assert "#SBATCH --time=00:20:00" in script  # 2 configurations x the base walltime
    assert f"sweep {d / 'spec.yaml'} --mode inline --resume --dir {d}" in script
    deadline = time.monotonic() + 1200
    while json.loads(aegis(slurm_cluster, "status", d / "inline-job", "--json").stdout)["state"] != "completed":
        assert time.monotonic() < deadline, (d / "inline-job" / f"slurm-{job_id}.out").read_text()
        time.sleep(2)
    st = statuses(d)
    assert len(st) == 2 and all(s["state"] == "done" and s["job_id"] == job_id for s in st.values())
    first, second = sorted(st.values(), key=lambda s: s["started"])
    assert first["finished"] <= second["started"]  # one after another
    assert (d / "report" / "summary.csv").exists()
    # Submitting again while results exist needs --resume, and then there is nothing left to run.
    r = aegis(slurm_cluster, "sweep", spec, *SITE, "--mode", "inline", "--submit", "--dir", d, "--resume",
              cwd=tmp_path)
    assert r.returncode == 2 and "nothing to submit" in r.stderr
