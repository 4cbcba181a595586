"""aegis's PBS paths against the real OpenPBS complex of tests/pbs (2 nodes): qsub, PBS_NODEFILE/PBS_JOBID,
`qstat -f -F json -x`, qdel, walltime kills, queue limits, a simulated fleet on both nodes and a real CPU vLLM
instance (issue 18).

The site is tests/sched/sites/testpbs.yaml: one agent per node through Open MPI's mpiexec, whose daemons
reach the other node through pbs_tmrsh (the fixture's aegis-tmrsh). Jobs run as root; `qsub` passes no
environment, so every config exports PYTHONPATH (this checkout) for the job and its agents.
"""
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from aegis.config.sites import load_site
from aegis.schedulers.base import JobState
from aegis.schedulers.pbs import EXIT_WALLTIME, PBSScheduler, parse_qstat_json
from tests.fixtures.pbs import pbs_complex, queue_limits  # noqa: F401
from tests.fixtures.vllm import BASE_ARGS, BASE_ENV, run_processes

SITE = Path(__file__).parent / "sites" / "testpbs.yaml"
CPU_SITE = SITE.with_name("testpbs-cpu.yaml")  # one core per node, for a real CPU vLLM
REPO = Path(__file__).resolve().parents[2]
RECORDED = REPO / "tests" / "pbs" / "recorded"
pytestmark = pytest.mark.slow
# Startup too slow to finish: keeps a job running (its engines "loading") until it is ended.
FOREVER = ["--decode-ms", "1", "--startup-seconds", "600"]


def aegis(pbs, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", "aegis", *map(str, args)], capture_output=True, text=True,
                          env=pbs.env, cwd=REPO, timeout=timeout)


def config(tmp_path, name="c.yaml", **raw):
    path = tmp_path / name
    raw.setdefault("env", {})["PYTHONPATH"] = str(REPO)  # the job's aegis is this checkout's
    path.write_text(yaml.safe_dump({"model": "sim-small", "engine": "sim", "instances": 2,
                                    "tensor_parallel_size": 2, **raw}))  # one instance per node: 2 nodes
    return path


def ctime(text: str) -> datetime.datetime:
    """qstat's times ("Fri Dec  4 16:33:43 2026", ctime(3)) as a naive local datetime."""
    return datetime.datetime.strptime(text, "%a %b %d %H:%M:%S %Y")


def why(proc, run) -> str:
    """A failed command's output and the end of its job's log (what the job said on the nodes)."""
    log = run / "pbs.out"
    tail = log.read_text()[-3000:] if log.exists() else "(no pbs.out)"
    return f"{proc.stdout}{proc.stderr}--- {log}:\n{tail}"


def status(pbs, run) -> dict:
    proc = aegis(pbs, "status", run, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_status(pbs, run, wanted: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = status(pbs, run)
        if doc["state"] == wanted or doc["state"] in ("completed", "failed", "cancelled", "timeout"):
            return doc
        assert time.monotonic() < deadline, f"still {doc['state']} after {timeout}s: {doc}"
        time.sleep(0.5)


def wait_engines(run, count: int, timeout: float = 60) -> None:
    """Until `count` agents have reported and started their engines."""
    deadline = time.monotonic() + timeout
    while len(sim_servers()) < count or len(list((run / "nodes").glob("*.status.json"))) < count:
        assert time.monotonic() < deadline, f"agents/engines did not start: {sim_servers()}"
        time.sleep(0.3)


def sim_servers() -> list[psutil.Process]:
    """The simulated engines running on the complex's nodes (started with --host pbsnodeN)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "aegis.testing.simserver" in cmd and any(a.startswith("pbsnode") for a in cmd):
            out.append(p)
    return out


def wait_no_servers(timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while sim_servers():
        assert time.monotonic() < deadline, f"engines left behind: {[p.info['cmdline'] for p in sim_servers()]}"
        time.sleep(0.3)


@pytest.fixture(autouse=True)
def delete_leftover_jobs(pbs_complex):  # noqa: F811
    """Whatever a test submitted is deleted when it ends, also when it failed half-way."""
    before = pbs_complex.job_ids()
    yield
    left = sorted(pbs_complex.job_ids() - before)
    if left:
        pbs_complex.run("qdel", "-W", "force", *left, check=False)
    wait_no_servers()


def test_check_job_on_both_nodes(pbs_complex, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    proc = aegis(pbs_complex, "submit", config(tmp_path), "--site-file", SITE, "--run-dir", run, "--check",
                 "--wait", "--timeout", "120")
    assert proc.returncode == 0, why(proc, run)
    script = (run / "job.sh").read_text()
    assert "#PBS -l select=2:ncpus=1\n" in script and "#PBS -l place=scatter\n" in script
    assert "#PBS -q debug\n" in script and "#PBS -l filesystems=home:shared\n" in script
    job_id = (run / "job_id").read_text().strip()
    assert job_id.endswith(f".{pbs_complex.server}") and job_id.split(".")[0].isdigit()
    alloc = json.loads((run / "allocation.json").read_text())  # from PBS_NODEFILE / PBS_JOBID inside the job
    assert alloc["scheduler"] == "pbs" and alloc["job_id"] == job_id
    assert alloc["hosts"] == list(pbs_complex.nodes)
    check = json.loads((run / "check.json").read_text())
    assert check["ok"] is True
    assert [(r["index"], r["host"]) for r in check["reports"]] == list(enumerate(pbs_complex.nodes))
    assert len({r["pid"] for r in check["reports"]}) == 2
    # The server's own record, as the backend reads it (JSON, finished jobs with -x).
    raw = pbs_complex.run("qstat", "-f", "-F", "json", "-x", job_id).stdout
    info = parse_qstat_json(raw)[job_id]
    assert info.state == JobState.COMPLETED and info.raw_state == "F" and info.exit_code == "0"
    assert info.nodes == ",".join(pbs_complex.nodes)
    doc = status(pbs_complex, run)
    assert doc["job_id"] == job_id and doc["state"] == "completed" and doc["raw_state"] == "F"
    assert doc["exit_code"] == "0" and doc["log"] == str(run / "pbs.out")


def test_failed_job_reports_failed_with_its_exit_status(pbs_complex, tmp_path):  # noqa: F811
    # Neither engine becomes healthy in time and none may restart: every instance fails, so does the job.
    cfg = config(tmp_path, extra_args=FOREVER, startup_timeout=3, max_restarts=0)
    run = tmp_path / "run"
    proc = aegis(pbs_complex, "submit", cfg, "--site-file", SITE, "--run-dir", run, "--wait", "--timeout", "120")
    assert proc.returncode == 3, why(proc, run)
    job_id = (run / "job_id").read_text().strip()
    attrs = pbs_complex.job(job_id)
    code = attrs["Exit_status"]
    assert attrs["job_state"] == "F" and code not in (0, EXIT_WALLTIME)
    last = proc.stderr.strip().splitlines()[-1]
    assert f"job {job_id} ended (failed, exit code {code})" in last and str(run / "pbs.out") in last
    doc = status(pbs_complex, run)
    assert doc["state"] == "failed" and doc["exit_code"] == str(code)
    ends = json.loads((run / "endpoints.json").read_text())
    assert ends["state"] == "failed" and [i["status"] for i in ends["instances"]] == ["failed", "failed"]


def test_cancel_running_job(pbs_complex, tmp_path, monkeypatch):  # noqa: F811
    cfg = config(tmp_path, extra_args=FOREVER, startup_timeout=600)
    run = tmp_path / "run"
    proc = aegis(pbs_complex, "submit", cfg, "--site-file", SITE, "--run-dir", run, "--json")
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    wait_engines(run, 2)
    assert {p.info["cmdline"][p.info["cmdline"].index("--host") + 1] for p in sim_servers()} == set(
        pbs_complex.nodes)
    running = status(pbs_complex, run)
    assert running["state"] == "running" and running["raw_state"] == "R"
    assert aegis(pbs_complex, "cancel", run).returncode == 0
    doc = wait_status(pbs_complex, run, "cancelled")
    assert doc["state"] == "cancelled" and doc["raw_state"] == "F", doc
    attrs = pbs_complex.job(job_id)
    assert str(attrs["substate"]) == "91"  # deleted (root's job: its Exit_status says nothing)
    wait_no_servers()  # the engines went with the job, on both nodes
    for name in ("PATH", "PBS_CONF_FILE"):  # the backend in this process: the complex's qstat
        monkeypatch.setenv(name, pbs_complex.env[name])
    assert PBSScheduler().status([job_id])[job_id].state == JobState.CANCELLED
    assert aegis(pbs_complex, "cancel", run).returncode == 0  # qdel of a finished job is not an error


def test_walltime_exceeded_ends_timeout(pbs_complex, tmp_path):  # noqa: F811
    cfg = config(tmp_path, extra_args=FOREVER, startup_timeout=600, walltime="00:00:10")
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = aegis(pbs_complex, "submit", cfg, "--site-file", SITE, "--run-dir", run, "--wait", "--timeout", "90")
    took = time.monotonic() - t0
    assert proc.returncode == 3, why(proc, run)
    assert "#PBS -l walltime=00:00:10\n" in (run / "job.sh").read_text()
    job_id = (run / "job_id").read_text().strip()
    assert f"job {job_id} ended (timeout" in proc.stderr.strip().splitlines()[-1]
    assert 10 <= took < 60, took
    attrs = pbs_complex.job(job_id)
    assert attrs["Exit_status"] == EXIT_WALLTIME
    doc = status(pbs_complex, run)
    assert doc["state"] == "timeout" and doc["exit_code"] == str(EXIT_WALLTIME)
    wait_no_servers()


def test_sim_fleet_ready_on_both_nodes_then_shutdown(pbs_complex, tmp_path):  # noqa: F811
    cfg = config(tmp_path, extra_args=["--decode-ms", "1", "--startup-seconds", "0.3"], startup_timeout=60,
                 shutdown_grace=10)
    run = tmp_path / "run"
    proc = aegis(pbs_complex, "submit", cfg, "--site-file", SITE, "--run-dir", run, "--wait", "--timeout", "120")
    assert proc.returncode == 0, why(proc, run)
    job_id = (run / "job_id").read_text().strip()
    ends = json.loads((run / "endpoints.json").read_text())
    assert ends["state"] == "ready" and ends["scheduler"] == "pbs" and ends["job_id"] == job_id
    insts = ends["instances"]
    assert [(i["hostname"], i["status"]) for i in insts] == [(n, "ready") for n in pbs_complex.nodes]
    # Each engine answers from its node, with the run's key.
    key = (run / "api_key").read_text().strip()
    for inst in insts:
        req = urllib.request.Request(inst["url"] + "/v1/completions", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {key}"},
            data=json.dumps({"model": "sim-small", "prompt": "hi", "max_tokens": 3}).encode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 3
    assert status(pbs_complex, run)["state"] == "running"
    # Issue 17: an agent killed on the second node. Open MPI's mpiexec then ends the whole step (every agent,
    # and with them every engine); the head starts the step again within the restart budget, and both nodes
    # serve again with new engines.
    agents = {json.loads(p.read_text())["host"]: json.loads(p.read_text())["agent_pid"]
              for p in (run / "nodes").glob("*.status.json")}
    t0 = time.monotonic()
    os.kill(agents[pbs_complex.nodes[1]], signal.SIGKILL)
    deadline = t0 + 90
    while True:
        again = json.loads((run / "endpoints.json").read_text())
        if again["state"] == "ready" and all(i["pid"] not in (None, old["pid"])
                                             for i, old in zip(again["instances"], insts)):
            break
        assert time.monotonic() < deadline, why(proc, run)
        time.sleep(1)
    print(f"PBS: agent killed -> instances ready again after {time.monotonic() - t0:.0f} s")
    proc = aegis(pbs_complex, "shutdown", run, "--timeout", "60")
    assert proc.returncode == 0, why(proc, run)
    doc = wait_status(pbs_complex, run, "completed")
    assert doc["state"] == "completed" and doc["exit_code"] == "0", doc
    assert doc["endpoints"]["state"] == "stopped"
    assert all(i["status"] == "stopped" for i in doc["endpoints"]["instances"])
    wait_no_servers()


def test_job_after_another_waits_held_then_runs(pbs_complex, tmp_path):  # noqa: F811
    """qsub.1B, -W depend=afterany:<job ID>: "may be scheduled for execution after all jobs in arg list have
    finished execution, with any exit status". While A runs, B is H (substate 22, JOB_SUBSTATE_DEPNHOLD)."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    proc = aegis(pbs_complex, "submit", config(tmp_path, "a.yaml", extra_args=FOREVER, startup_timeout=600),
                 "--site-file", SITE, "--run-dir", run_a, "--json")
    assert proc.returncode == 0, proc.stderr
    job_a = json.loads(proc.stdout)["job_id"]
    wait_status(pbs_complex, run_a, "running")
    proc = aegis(pbs_complex, "submit", config(tmp_path, "b.yaml"), "--site-file", SITE, "--run-dir", run_b,
                 "--check", "--after", run_a, "--json")
    assert proc.returncode == 0, proc.stderr
    job_b = json.loads(proc.stdout)["job_id"]
    assert f"#PBS -W depend=afterany:{job_a}\n" in (run_b / "job.sh").read_text()
    attrs = pbs_complex.job(job_b)  # the server's own record
    assert (attrs["job_state"], attrs["substate"], attrs["Hold_Types"]) == ("H", 22, "s"), attrs
    assert attrs["depend"] == f"afterany:{job_a}@{pbs_complex.server}"
    doc = status(pbs_complex, run_b)
    assert (doc["state"], doc["raw_state"]) == ("pending", "H")
    assert doc["reason"] == f"Dependency (afterany:{job_a}@{pbs_complex.server})"
    text = aegis(pbs_complex, "status", run_b).stdout
    assert f"job {job_b} (testpbs): pending [H] (Dependency (afterany:{job_a}@" in text
    time.sleep(3)  # a scheduling cycle later, B still waits (both nodes would be free for it: it is the hold)
    assert pbs_complex.job(job_b)["job_state"] == "H"
    assert aegis(pbs_complex, "cancel", run_a).returncode == 0
    proc = aegis(pbs_complex, "submit", config(tmp_path, "c.yaml"), "--site-file", SITE, "--run-dir",
                 tmp_path / "c", "--check", "--after", job_a, "--after-ok", job_b, "--json")
    assert proc.returncode == 0, proc.stderr  # a finished job (in the history) and a held one: both allowed
    job_c = json.loads(proc.stdout)["job_id"]
    done = pbs_complex.wait_finished(job_b, timeout=120)
    assert done["Exit_status"] == 0
    # qsub.1B: "PBS adds before dependencies automatically to the targets of after dependencies".
    assert done["depend"] == f"beforeok:{job_c}@{pbs_complex.server}"
    assert status(pbs_complex, run_b)["state"] == "completed"
    assert json.loads((run_b / "check.json").read_text())["ok"] is True
    assert ctime(pbs_complex.job(job_a)["obittime"]) <= ctime(done["stime"])  # B started once A had ended
    assert pbs_complex.wait_finished(job_c, timeout=120)["Exit_status"] == 0  # afterok of B: B exited 0


def test_begin_time_waits_then_runs(pbs_complex, tmp_path):  # noqa: F811
    """qsub.1B, -a [[[[CC]YY]MM]DD]hhmm[.SS]: "Point in time after which the job is eligible for execution";
    until then the job is W (substate 30, JOB_SUBSTATE_WAITING) with that Execution_Time."""
    run = tmp_path / "run"
    begin = (datetime.datetime.now() + datetime.timedelta(seconds=12)).replace(microsecond=0)
    proc = aegis(pbs_complex, "submit", config(tmp_path), "--site-file", SITE, "--run-dir", run, "--check",
                 "--begin", begin.isoformat(), "--json")
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    attrs = pbs_complex.job(job_id)
    assert (attrs["job_state"], attrs["substate"]) == ("W", 30), attrs
    assert attrs["Execution_Time"] == begin.strftime("%a %b %e %H:%M:%S %Y")  # qstat's ctime(3) form
    doc = status(pbs_complex, run)
    assert (doc["state"], doc["raw_state"], doc["reason"]) == ("pending", "W", f"BeginTime ({attrs['Execution_Time']})")
    done = pbs_complex.wait_finished(job_id, timeout=120)
    assert done["Exit_status"] == 0 and ctime(done["stime"]) >= begin


def test_launch_inside_an_interactive_qsub_finds_its_nodes(pbs_complex, tmp_path):  # noqa: F811
    """`aegis launch --check` typed into a `qsub -I` shell (docs/schedulers.md, "Interactive allocations").

    qsub -I insists on a terminal (src/cmds/qsub.c: "standard input and output must be a terminal for
    interactive job submission"), so util-linux's script(1) gives it a pty; the shell's lines are typed once
    qsub says "job ... ready". The site's `setup:` lines are what a user runs first by hand.
    """
    run = tmp_path / "run"
    cfg = config(tmp_path)
    setup = yaml.safe_load(SITE.read_text())["setup"]
    lines = [*setup, f"export PYTHONPATH={REPO}", f"cd {tmp_path}",
             # </dev/null: mpiexec forwards its stdin to rank 0, which would swallow the lines typed after it
             f"{sys.executable} -m aegis launch {cfg} --site-file {SITE} --check --run-dir {run} </dev/null",
             "echo AEGIS_RC=$?", "exit"]
    qsub = "qsub -I -q debug -l select=2:ncpus=1 -l place=scatter -l walltime=00:05:00"
    proc = subprocess.Popen(["script", "-qec", qsub, "/dev/null"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=pbs_complex.env, cwd=tmp_path, text=True)
    assert proc.stdin and proc.stdout
    seen = []
    try:
        for line in proc.stdout:  # qsub: waiting for job 12.pbshead to start / qsub: job 12.pbshead ready
            seen.append(line)
            if line.startswith("qsub: job ") and line.strip().endswith(" ready"):
                break
        job_id = seen[-1].split()[2]
        proc.stdin.write("".join(f"{line}\n" for line in lines))
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the interactive job did not end: {''.join(seen)}{exc.output!r}"[-4000:])
    finally:
        proc.kill()
    text = "".join(seen) + out
    assert "AEGIS_RC=0" in text.replace("\r", ""), text[-4000:]
    assert f"qsub: job {job_id} completed" in text
    alloc = json.loads((run / "allocation.json").read_text())  # PBS_NODEFILE / PBS_JOBID in the shell
    assert alloc["scheduler"] == "pbs" and alloc["job_id"] == job_id and alloc["hosts"] == list(pbs_complex.nodes)
    check = json.loads((run / "check.json").read_text())
    assert check["ok"] is True
    assert [(r["index"], r["host"]) for r in check["reports"]] == list(enumerate(pbs_complex.nodes))
    attrs = pbs_complex.wait_finished(job_id)
    assert attrs["interactive"] in (True, "True"), attrs  # the server's record: an interactive job


def test_sweep_one_job_per_configuration(pbs_complex, tmp_path):  # noqa: F811
    """`aegis sweep --mode jobs` (docs/sweep.md) on the complex: one qsub per point, each running
    `aegis sweep-point DIR` with a simulated engine, followed through qstat until every job has ended."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "pbsjobs",
        "base": {"model": "sim-small", "engine": "sim", "instances": 1, "tensor_parallel_size": 2,
                 "env": {"PYTHONPATH": str(REPO)}, "extra_args": ["--decode-ms", "1"], "startup_timeout": 60},
        "axes": {"max_num_seqs": [4, 8]},
        "bench": {"input_len": 16, "output_len": 4, "rate": 20, "num_requests": 8}}))
    d = tmp_path / "sweep"
    proc = aegis(pbs_complex, "sweep", spec, "--site-file", SITE, "--site", "testpbs", "--mode", "jobs",
                 "--dir", d, timeout=400)
    logs = "".join(p.read_text()[-2000:] for p in d.glob("*/pbs.out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert proc.stderr.count("submitted job") == 2
    points = {f.parent: json.loads(f.read_text()) for f in d.glob("*/status.json")}
    assert len(points) == 2 and all(s["state"] == "done" for s in points.values()), points
    for point, st in points.items():
        job_id = (point / "job_id").read_text().strip()
        assert st["job_id"] == job_id and st["host"] in pbs_complex.nodes  # ran inside its own PBS job
        attrs = pbs_complex.job(job_id)
        assert (attrs["job_state"], attrs["Exit_status"]) == ("F", 0), attrs
        assert (point / "job.sh").read_text().rstrip().endswith(f"sweep-point {point}")
        summary = json.loads((point / "bench" / "summary.json").read_text())
        assert summary["completed"] == 8 and summary["failed"] == 0
    assert (d / "report" / "summary.csv").exists()


def test_serve_chain_hands_over_on_pbs(pbs_complex, tmp_path):  # noqa: F811
    """Issue 16 on PBS: `aegis serve` with 2-minute jobs submits a successor with qsub, hands over when it is
    ready, and the old job ends by aegis (Exit_status 0), not by its walltime; requests through the gateway
    all succeed meanwhile."""
    import threading

    from tests.fixtures.gateway import call

    cfg = config(tmp_path, instances=1, tensor_parallel_size=1, walltime="00:02:00", queue="workq",
                 extra_args=["--decode-ms", "2", "--startup-seconds", "1"], shutdown_grace=15)
    sdir = tmp_path / "svc"
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "aegis", "serve", str(cfg), "--site-file", str(SITE),
                             "--duration", "150s", "--lead", "75", "--gateway-host", "127.0.0.1", "--gateway-port",
                             "0", "--service-dir", str(sdir)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=pbs_complex.env, cwd=REPO)
    codes: list[int] = []
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 120
        while True:
            chain = json.loads((sdir / "service.json").read_text()) if (sdir / "service.json").exists() else {}
            if any(j["role"] == "serving" for j in chain.get("jobs", [])):
                break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        url, key = chain["gateway"], (sdir / "gateway.key").read_text().strip()

        def steady() -> None:
            while not stop.is_set():
                codes.append(call(url + "/v1/completions", key, {"model": "sim-small", "prompt": "x",
                                                                 "max_tokens": 4})[0])
                time.sleep(0.2)

        loader = threading.Thread(target=steady)
        loader.start()
        deadline = time.monotonic() + 150
        while not chain.get("handovers") or chain["handovers"][0].get("old_ended") is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(1)
            chain = json.loads((sdir / "service.json").read_text())
        stop.set()
        loader.join(30)
        assert proc.wait(120) == 0, log.read_text()
    finally:
        stop.set()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(120)
    chain = json.loads((sdir / "service.json").read_text())
    old = chain["jobs"][0]
    assert old["end_reason"] == "handed over" and chain["handovers"][0]["old_walltime_left"] > 0
    attrs = pbs_complex.wait_finished(old["job_id"], timeout=60)
    assert int(attrs.get("Exit_status", -1)) == 0, attrs  # ended by aegis, not by the walltime (-29)
    assert len(codes) > 20 and set(codes) == {200}, sorted(set(codes))
    assert chain["state"] == "ended" and all(j["role"] == "ended" for j in chain["jobs"])


def recorded(name: str) -> tuple[int, str]:
    """A command's exit status and stderr as recorded from the complex (tests/pbs/record*.sh)."""
    return int((RECORDED / f"{name}.rc").read_text()), (RECORDED / f"{name}.stderr").read_text()


def test_queue_table_is_the_servers(pbs_complex):  # noqa: F811
    """testpbs.yaml's queue table states the limits the server enforces (set by tests/pbs/start.sh), as
    `qstat -Q -f -F json` lists them (recorded: tests/pbs/recorded/qstat-Qf-json.json)."""
    server = queue_limits(pbs_complex.run("qstat", "-Q", "-f", "-F", "json").stdout)
    table = {row.name: (row.min_nodes, row.max_nodes, row.max_walltime) for row in load_site("testpbs", [SITE]).queues}
    assert server == table, ("the server's queue limits (tests/pbs/start.sh) and testpbs.yaml's table differ; "
                             "a complex started by an older start.sh: bash tests/pbs/start.sh --restart")


def test_queue_limits_aegis_routes_and_refuses_as_the_server(pbs_complex, tmp_path):  # noqa: F811
    """aegis sends a job to the first queue of the table that takes it, and refuses before qsub what the
    server refuses. For each refusal the job script of an accepted job, forced past the same limit on the
    qsub command line, is refused by the real qsub with what tests/pbs/record*.sh recorded: "qsub: Job
    violates queue and/or server resource limits", exit 188 (qsub-over-queue-limit.txt, qsub-limit-*.txt)."""
    def submit(name, **raw):
        run = tmp_path / name
        proc = aegis(pbs_complex, "submit", config(tmp_path, f"{name}.yaml", **{"instances": 1, **raw}), "--site-file",
                     SITE, "--run-dir", run, "--check", "--json")
        return run, proc

    def qsub(run, *args):
        proc = pbs_complex.run("qsub", *args, str(run / "job.sh"), check=False, cwd=run)
        return proc.returncode, proc.stderr

    # Accepted: 1 node for 5 minutes goes to debug, 1 node for 2 hours (over debug's hour) to workq.
    small, proc = submit("small")
    assert proc.returncode == 0, proc.stderr
    small_id = json.loads(proc.stdout)["job_id"]
    long, proc = submit("long", walltime="02:00:00")
    assert proc.returncode == 0, proc.stderr
    long_id = json.loads(proc.stdout)["job_id"]
    assert "#PBS -q debug\n" in (small / "job.sh").read_text() and pbs_complex.job(small_id)["queue"] == "debug"
    assert "#PBS -q workq\n" in (long / "job.sh").read_text() and pbs_complex.job(long_id)["queue"] == "workq"
    assert qsub(long, "-q", "debug") == recorded("qsub-over-queue-limit.txt")  # what aegis routed around

    # Refused by aegis, one line, exit 2, nothing submitted; the server refuses the same.
    refusals = [
        ({"walltime": "48:00:00"}, "no queue of site testpbs takes 1 node(s) for 48:00:00",
         [(("-q", q, "-l", "walltime=48:00:00", "-l", "select=2:ncpus=1"), f"qsub-limit-walltime-{q}.txt")
          for q in ("debug", "workq", "prod")]),
        ({"instances": 3}, "no queue of site testpbs takes 3 node(s) for 00:05:00",
         [(("-q", "workq", "-l", "select=3:ncpus=1"), "qsub-limit-three-nodes-workq.txt")]),
        ({"queue": "prod"}, "queue 'prod' of site testpbs does not take 1 node(s) for 00:05:00",
         [(("-q", "prod"), "qsub-limit-one-node-prod.txt")]),
    ]
    for i, (raw, words, forced) in enumerate(refusals):
        run, proc = submit(f"refused{i}", **raw)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert not (run / "job_id").exists()
        for args, name in forced:
            assert qsub(small, *args) == recorded(name), (args, name)

    for job_id, queue in ((small_id, "debug"), (long_id, "workq")):  # both ran where aegis sent them
        attrs = pbs_complex.wait_finished(job_id, timeout=120)
        assert (attrs["queue"], attrs["Exit_status"]) == (queue, 0), attrs


def test_cpu_vllm_instance_in_a_pbs_job(pbs_complex, tmp_path, vllm_env):  # noqa: F811
    """A real CPU vLLM instance (the tiny model, one core of one node) started by `aegis submit --wait` in a
    PBS job: it answers with the run's key and refuses without it (401), and after `aegis shutdown` the job
    ends by itself (Exit_status 0, substate 92 "finished", not deleted) and nothing of the run is left."""
    cfg = config(tmp_path, model=str(vllm_env.model_dir), engine="vllm", engine_python=str(vllm_env.python),
                 instances=1, tensor_parallel_size=1, env=dict(BASE_ENV), extra_vllm_args=list(BASE_ARGS),
                 startup_timeout=300, walltime="00:10:00")
    run = tmp_path / "run"
    proc = aegis(pbs_complex, "submit", cfg, "--site-file", CPU_SITE, "--run-dir", run, "--wait", "--timeout",
                 "300", timeout=360)
    assert proc.returncode == 0, why(proc, run)
    job_id = (run / "job_id").read_text().strip()
    ends = json.loads((run / "endpoints.json").read_text())
    assert (ends["scheduler"], ends["job_id"], ends["state"]) == ("pbs", job_id, "ready"), ends
    (inst,) = ends["instances"]
    assert (inst["engine"], inst["status"]) == ("vllm", "ready"), inst
    assert inst["hostname"] in pbs_complex.nodes and inst["url"] == f"http://{inst['hostname']}:{inst['port']}"
    key = (run / "api_key").read_text().strip()
    body = {"model": inst["model"], "prompt": "hi", "max_tokens": 3}

    def complete(headers):
        req = urllib.request.Request(inst["url"] + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None

    code, doc = complete({"Authorization": f"Bearer {key}"})
    assert code == 200 and doc["usage"]["completion_tokens"] == 3, doc
    assert complete({})[0] == 401
    proc = aegis(pbs_complex, "shutdown", run, "--timeout", "120")
    assert proc.returncode == 0, why(proc, run)
    attrs = pbs_complex.wait_finished(job_id, timeout=120)
    assert (attrs["Exit_status"], attrs["substate"]) == (0, 92), attrs  # ended by itself, not by qdel (91)
    assert status(pbs_complex, run)["state"] == "completed"
    deadline = time.monotonic() + 60
    while run_processes(run):
        assert time.monotonic() < deadline, f"left behind: {[p.cmdline()[:3] for p in run_processes(run)]}"
        time.sleep(1)
