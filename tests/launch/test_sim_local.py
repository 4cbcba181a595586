"""`engine: sim` on the local-sim site: a whole `aegis launch` without vLLM, Slurm or GPUs (fast loop).

The simulator is supervised like vLLM: health-gated, keyed, restarted when killed, stopped with
nothing left; endpoints.json carries the startup phases and `aegis status` shows them.
"""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
import yaml

from aegis.launch.endpoints import PHASES, EndpointsFile
from aegis.rundir import RunDir
from aegis.schedulers.base import JobInfo, JobState
from aegis.schedulers.jobs import describe
from tests.launch.fleet import Fleet, aegis, free_port_block


def launch_sim(tmp_path, run, instances: int, port: int, **config) -> Fleet:
    """`aegis launch` of `instances` simulated engines on local-sim, in the background (config: more keys)."""
    cfg = {"site": "local-sim", "model": "sim-small", "engine": "sim", "instances": instances, "port_start": port,
           **config}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "launch.log"
    proc = subprocess.Popen([sys.executable, "-m", "aegis", "launch", str(tmp_path / "c.yaml"), "--run-dir",
                             str(run)], stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "AEGIS_TEST_RUN": str(run)})
    return Fleet(run, proc, log)


@pytest.fixture
def sim_fleet(tmp_path):
    fleet = launch_sim(tmp_path, tmp_path / "run", 4, free_port_block(4),
                       extra_args=["--decode-ms", "1", "--startup-seconds", "0.3"], startup_timeout=60,
                       shutdown_grace=10, liveness_interval=2, liveness_misses=3)
    yield fleet
    tear_down(fleet)


def tear_down(fleet: Fleet) -> None:
    """Shut a fleet down as a user would, then kill whatever of it is left (a failed test's leftovers)."""
    if fleet.proc.poll() is None:
        aegis("shutdown", fleet.run_dir, "--timeout", "60", check=False)
        fleet.proc.wait(60)
    for p in fleet.processes():
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def completion(url: str, key: str | None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + "/v1/completions", headers=headers,
                                 data=json.dumps({"model": "sim-small", "prompt": "hi", "max_tokens": 3}).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_sim_fleet_serves_restarts_and_stops(sim_fleet):
    doc = sim_fleet.wait(lambda d: d.get("state") == "ready", 90, "4 sim instances ready")
    doc = sim_fleet.wait(lambda d: all("loaded" in i["phases"] for i in d["instances"]), 10, "loaded phases")
    insts = doc["instances"]
    assert [i["engine"] for i in insts] == ["sim"] * 4
    for inst in insts:  # phases in order, "loaded" from the simulator's log line (--startup-seconds 0.3)
        p = inst["phases"]
        assert list(p) == [ph for ph in PHASES if ph in p] and set(p) == set(PHASES), p
        assert p["staged"] <= p["started"] <= p["loaded"] <= p["ready"]
        assert p["loaded"] - p["started"] >= 0.3
    assert completion(insts[0]["url"], sim_fleet.key)["usage"]["completion_tokens"] == 3
    with pytest.raises(urllib.error.HTTPError, match="401"):
        completion(insts[0]["url"], None)
    lines = describe(JobInfo("1", JobState.RUNNING), RunDir(sim_fleet.run_dir), "local-sim")
    assert any(line.strip().startswith("ready") and line.strip().endswith("4/4") for line in lines), lines

    victim = insts[1]
    os.kill(victim["pid"], signal.SIGKILL)
    doc = sim_fleet.wait(lambda d: d["instances"][1]["restarts"] == 1 and d["instances"][1]["status"] == "ready"
                         and d["state"] == "ready", 60, "the killed instance restarted")
    assert doc["instances"][1]["pid"] != victim["pid"]
    assert doc["instances"][1]["phases"] == victim["phases"]  # first-time phases: a restart keeps them
    assert [i["restarts"] for i in doc["instances"]] == [0, 1, 0, 0]
    revision = doc["revision"]

    assert aegis("shutdown", sim_fleet.run_dir, "--timeout", "60").returncode == 0
    sim_fleet.proc.wait(60)
    final = EndpointsFile.read(sim_fleet.run_dir)
    assert final.state.value == "stopped" and final.revision > revision
    deadline = time.monotonic() + 20
    while sim_fleet.processes():
        assert time.monotonic() < deadline, [p.cmdline()[:4] for p in sim_fleet.processes()]
        time.sleep(0.5)


def test_sim_refuses_its_unknown_flags_and_real_engines_on_local_sim(tmp_path):
    (tmp_path / "a.yaml").write_text("site: local-sim\nmodel: m\nengine: sim\nextra_args: [--decode-ms, fast]\n")
    proc = aegis("plan", tmp_path / "a.yaml", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "extra_args: argument --decode-ms: invalid float value: 'fast'" in proc.stderr
    (tmp_path / "b.yaml").write_text("site: local-sim\nmodel: m\nengine: sim\nextra_args: [--port, '9']\n")
    assert "--port is set by aegis from the plan" in aegis("plan", tmp_path / "b.yaml", check=False).stderr
    (tmp_path / "c.yaml").write_text("site: local-sim\nmodel: m\n")
    proc = aegis("plan", tmp_path / "c.yaml", check=False)
    assert proc.returncode == 2 and "engine 'vllm' does not run on devices selected with AEGIS_SIM_DEVICES" \
        in proc.stderr


def _gone(pids: list[int], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _agent_pid(run) -> int:
    return json.loads(next((run / "nodes").glob("*.status.json")).read_text())["agent_pid"]


def test_engines_die_with_their_agent_and_a_new_agent_takes_over(sim_fleet):
    """Issue 17: a SIGKILLed agent must not leave engines serving the run's key with nobody supervising them,
    and (the allocation allows it: here the launcher step is the agent) the head starts a new agent, whose
    engines serve again, within the restart budget."""
    doc = sim_fleet.wait(lambda d: d.get("state") == "ready", 90, "4 sim instances ready")
    doc = sim_fleet.wait(lambda d: all("loaded" in i["phases"] for i in d["instances"]), 10, "loaded phases")
    pids = [i["pid"] for i in doc["instances"]]
    first = _agent_pid(sim_fleet.run_dir)
    t0 = time.monotonic()
    os.kill(first, signal.SIGKILL)
    _gone(pids, 15, "engines outlived their agent")
    doc = sim_fleet.wait(lambda d: d["state"] == "ready" and all(
        i["pid"] and i["pid"] not in pids for i in d["instances"]), 60, "a new agent's engines ready")
    took = time.monotonic() - t0
    assert _agent_pid(sim_fleet.run_dir) != first
    assert "starting it again (restart 1 of 3" in sim_fleet.log.read_text()
    key = sim_fleet.key
    assert completion(doc["instances"][0]["url"], key)["usage"]["completion_tokens"] == 3
    print(f"agent killed -> new agent's 4 sim engines ready in {took:.1f} s")


@pytest.mark.slow  # the fault-injection suite (issue 17): in .ci/run, not the fast loop
def test_a_hung_agent_is_replaced_and_its_engines_ended(tmp_path):
    """Issue 17: an agent that stops (SIGSTOP: alive, silent) is lost after 4 missed heartbeats (here 1 s); a new
    agent ends it and its engines (which a stopped agent cannot do) and serves again. With the budget spent
    (max_restarts 1 per window), the next loss fails the run with the reason instead of another agent."""
    fleet = launch_sim(tmp_path, tmp_path / "run", 2, free_port_block(2), heartbeat_interval=1, max_restarts=1,
                       extra_args=["--decode-ms", "1", "--startup-seconds", "0.3"], startup_timeout=60,
                       shutdown_grace=5)
    try:
        doc = fleet.wait(lambda d: d.get("state") == "ready", 90, "2 sim instances ready")
        pids = [i["pid"] for i in doc["instances"]]
        hung = _agent_pid(fleet.run_dir)
        t0 = time.monotonic()
        os.kill(hung, signal.SIGSTOP)
        doc = fleet.wait(lambda d: d["state"] == "ready" and all(
            i["pid"] and i["pid"] not in pids for i in d["instances"]), 60, "the new agent's engines ready")
        took = time.monotonic() - t0
        _gone([hung, *pids], 10, "the hung agent or its engines are still there")
        assert 4 <= took < 40, took
        assert "took over" in fleet.log.read_text()
        # Budget spent: the second loss is final, and says why.
        os.kill(_agent_pid(fleet.run_dir), signal.SIGKILL)
        assert fleet.proc.wait(60) != 0
        final = EndpointsFile.read(fleet.run_dir)
        assert final.state.value == "failed" and all(i.status.value == "failed" for i in final.instances)
        print(f"hung agent -> replaced, engines ready in {took:.1f} s")
    finally:
        tear_down(fleet)


@pytest.mark.slow  # the fault-injection suite (issue 17): in .ci/run, not the fast loop
def test_an_engine_that_answers_but_counts_no_token_is_restarted(tmp_path):
    """Issue 17, liveness that needs the engine to work: an engine whose HTTP server answers /health while its
    engine core is stuck (the simulator's --stall-after: requests stay running, no token is ever counted) is
    killed once it had requests running and no token counted for liveness_stall seconds, then restarted. A
    long request that keeps counting tokens, for longer than liveness_stall, is left alone."""
    import threading

    fleet = launch_sim(tmp_path, tmp_path / "run", 1, free_port_block(1), liveness_interval=1, liveness_stall=3,
                       extra_args=["--decode-ms", "2", "--startup-seconds", "0.3", "--stall-after", "2"],
                       startup_timeout=60, shutdown_grace=5)
    try:
        doc = fleet.wait(lambda d: d.get("state") == "ready", 90, "the sim instance ready")
        inst, key = doc["instances"][0], fleet.key
        t0 = time.monotonic()
        req = urllib.request.Request(inst["url"] + "/v1/completions", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {key}"},
            data=json.dumps({"model": "sim-small", "prompt": "hi", "max_tokens": 2500}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:  # ~5 s of tokens, longer than liveness_stall
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 2500
        assert time.monotonic() - t0 > 4
        assert completion(inst["url"], key)["usage"]["completion_tokens"] == 3
        assert fleet.endpoints()["instances"][0]["restarts"] == 0
        stuck = threading.Thread(target=_swallow, args=(lambda: completion(inst["url"], key),), daemon=True)
        t0 = time.monotonic()
        stuck.start()
        doc = fleet.wait(lambda d: d["state"] == "ready" and d["instances"][0]["pid"] not in (None, inst["pid"]),
                         60, "the stuck engine restarted and ready")
        took = time.monotonic() - t0
        assert doc["instances"][0]["restarts"] == 1
        log = (fleet.run_dir / "logs" / f"{inst['name']}.log").read_text()
        assert "had requests running and counted no token for" in log
        assert 3 <= took < 20, took
        print(f"stuck engine core -> restarted and ready in {took:.1f} s (liveness_stall 3 s)")
    finally:
        tear_down(fleet)


def _swallow(fn) -> None:
    try:
        fn()
    except Exception:
        pass


def test_plan_commands_are_what_the_agent_runs(sim_fleet, tmp_path):
    """Issue 13: `aegis plan --commands` shows the exact per-rank command lines, environment and cores; here
    compared with the processes the agent really started (their /proc cmdline and environ, their log)."""
    doc = sim_fleet.wait(lambda d: d.get("state") == "ready", 90, "4 sim instances ready")
    preview = json.loads(aegis("plan", tmp_path / "c.yaml", "--commands", "--json").stdout)
    assert preview["launch_step"]["argv"] == [sys.executable, "-m", "aegis", "agent", "--run-dir", "$AEGIS_RUN_DIR"]
    (node,) = preview["node_list"]
    ranks = {r["instance"]: r for r in node["ranks"]}
    assert sorted(ranks) == sorted(i["name"] for i in doc["instances"])
    key = (sim_fleet.run_dir / "api_key").read_text().strip()
    for inst in doc["instances"]:
        shown, proc = ranks[inst["name"]], psutil.Process(inst["pid"])
        assert proc.cmdline() == shown["argv"]
        environ = dict(line.split("=", 1) for line in
                       open(f"/proc/{proc.pid}/environ", "rb").read().decode().split("\0") if "=" in line)
        for name, value in shown["env"].items():
            expected = key if value == '$(cat "$AEGIS_RUN_DIR/api_key")' else value
            assert environ.get(name) == expected, name
        assert shown["log"].replace("$AEGIS_RUN_DIR", str(sim_fleet.run_dir)) == inst["log"]
    text = aegis("plan", tmp_path / "c.yaml", "--commands").stdout
    assert key not in text and "$(cat \"$AEGIS_RUN_DIR/api_key\")" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


@pytest.mark.slow  # the fault-injection suite (issue 17): in .ci/run, not the fast loop
def test_a_hung_engine_is_restarted(sim_fleet):
    """Issue 17: an engine that is alive but does not answer (SIGSTOP) is killed and restarted after
    liveness_misses unanswered probes (here 3 x 2 s), not left holding its port until startup_timeout."""
    doc = sim_fleet.wait(lambda d: d.get("state") == "ready", 90, "4 sim instances ready")
    victim = doc["instances"][1]
    time.sleep(3)  # one liveness round (2 s) after ready: the agent has seen it answer (hangs before that:
    t0 = time.monotonic()  # startup_timeout)
    os.kill(victim["pid"], signal.SIGSTOP)
    doc = sim_fleet.wait(lambda d: d["instances"][1]["pid"] != victim["pid"]
                         and d["instances"][1]["status"] == "ready", 60, "the hung engine restarted")
    took = time.monotonic() - t0
    assert doc["instances"][1]["restarts"] == 1 and 6 <= took < 40, took
    assert not psutil.pid_exists(victim["pid"]) or psutil.Process(victim["pid"]).status() == psutil.STATUS_ZOMBIE
    assert [i["restarts"] for i in doc["instances"]] == [0, 1, 0, 0]
    assert "did not answer 3 liveness probes" in (sim_fleet.run_dir / "logs" / f"{victim['name']}.log").read_text()


@pytest.mark.slow  # the fault-injection suite (issue 17): in .ci/run, not the fast loop
def test_a_port_held_by_someone_else_is_never_taken_for_ours(tmp_path):
    """Issue 17: with a stranger listening on an instance's port, that instance must not be declared ready on
    the stranger's answers; its agent does not start it, says who holds the port, and it ends failed."""
    import http.server
    import threading

    class Stranger(http.server.BaseHTTPRequestHandler):  # another run's server: answers like ours would
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "sim-small", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    port = free_port_block(2)
    stranger = http.server.ThreadingHTTPServer(("127.0.0.1", port + 1), Stranger)
    threading.Thread(target=stranger.serve_forever, daemon=True).start()
    run = tmp_path / "run"
    fleet = launch_sim(tmp_path, run, 2, port, api_key=False, max_restarts=1, startup_timeout=60, shutdown_grace=5)
    proc = fleet.proc
    try:
        doc = fleet.wait(lambda d: [i["status"] for i in d["instances"]] == ["ready", "failed"], 60,
                         "instance 0 ready, instance 1 failed")
        assert doc["state"] == "degraded"
        assert f"port {port + 1} on 127.0.0.1 is held by pid {os.getpid()}" in doc["instances"][1]["error"]
    finally:
        stranger.shutdown()
        stranger.server_close()
        aegis("shutdown", run, "--timeout", "60", check=False)
        proc.wait(60)
        for p in fleet.processes():
            os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.slow  # the fault-injection suite (issue 17): in .ci/run, not the fast loop
def test_a_killed_head_leaves_no_stale_ready(sim_fleet):
    """Issue 17: after the head is killed, endpoints.json said `ready` forever and `aegis shutdown` waited out its
    timeout. The engines go (their agents see their parent go, the engines die with their agents), and the next
    command that reads the run directory writes the truth: failed, and why."""
    doc = sim_fleet.wait(lambda d: d.get("state") == "ready", 90, "4 sim instances ready")
    pids = [i["pid"] for i in doc["instances"]]
    os.kill(sim_fleet.proc.pid, signal.SIGKILL)
    sim_fleet.proc.wait(10)
    deadline = time.monotonic() + 15
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, "engines outlived their head"
        time.sleep(0.2)
    t0 = time.monotonic()
    proc = aegis("shutdown", sim_fleet.run_dir, "--timeout", "60", check=False)
    assert proc.returncode == 0 and time.monotonic() - t0 < 10, proc.stderr  # nothing to wait for
    final = EndpointsFile.read(sim_fleet.run_dir)
    assert final.state.value == "failed"
    assert all(i.status.value == "failed" and "ended without stopping the run" in (i.error or "")
               for i in final.instances)
    view = json.loads(aegis("endpoints", sim_fleet.run_dir, "--format", "json").stdout)
    assert view["state"] == "failed" and {i["status"] for i in view["instances"]} == {"failed"}


@pytest.mark.slow  # the fault-injection suite (issue 17): in .ci/run, not the fast loop
def test_a_full_run_directory_filesystem_loses_no_supervision(tmp_path):
    """Issue 17: with the run directory's filesystem full, the agent crashed (leaving its engines alone), the head
    died with a traceback and endpoints.json stayed `ready`. Now a killed engine is still restarted while nothing
    can be written, the writes that failed are made again once there is room, and nothing prints a traceback."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    fs = tmp_path / "fs"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(fs)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    port = free_port_block(2)
    run = fs / "run"
    fleet = launch_sim(tmp_path, run, 2, port, startup_timeout=60, shutdown_grace=5, liveness_interval=0)
    proc, log = fleet.proc, fleet.log
    try:
        doc = fleet.wait(lambda d: d.get("state") == "ready", 60, "2 sim instances ready")
        victim = doc["instances"][0]
        with open(fs / "filler", "wb") as fh:  # fill the filesystem up
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # a new engine serves the victim's port though nothing can be written
            holders = [c.pid for c in psutil.net_connections("tcp")
                       if c.status == psutil.CONN_LISTEN and c.laddr.port == victim["port"]]
            if holders and holders[0] != victim["pid"]:
                break
            assert time.monotonic() < deadline, "the killed engine was not restarted on a full filesystem"
            time.sleep(0.5)
        assert proc.poll() is None  # the head lives
        (fs / "filler").unlink()  # room again: the reports and endpoints.json catch up
        doc = fleet.wait(lambda d: d["instances"][0]["restarts"] == 1 and d["instances"][0]["pid"] == holders[0]
                         and d["state"] == "ready", 30, "endpoints.json written again")
        aegis("shutdown", run, "--timeout", "60")
        proc.wait(30)
        outputs = log.read_text() + (run / "logs" / "agents.log").read_text()
        assert "Traceback" not in outputs, outputs[-3000:]
    finally:
        if proc.poll() is None:
            aegis("shutdown", run, "--timeout", "30", check=False)
            proc.wait(30)
        for p in fleet.processes():
            os.killpg(p.pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(fs)])
