"""The controller of `aegis serve`: one gateway URL, and a chain of jobs that outlives every walltime.

Every TICK seconds it looks at each job (its endpoints file; the scheduler every
JOB_POLL seconds) and decides, in this order:
- the service's end (`until`, `aegis serve --stop`, SIGINT/SIGTERM): stop every job (queued ones are
  cancelled, serving ones drained through the gateway and shut down), then the gateway;
- a job that ended without aegis ending it (failed, cancelled, its walltime): recorded with why;
- nothing serving and nothing queued: submit one (the first, or a replacement at once);
- a serving job whose walltime ends within `lead` seconds (and the service goes on past it): submit its
  successor, unless one is already queued (never more than one spare);
- a successor that is ready while an older job serves: hand over (the gateway routes to both; the old
  one is asked to shut down, its head waits for the gateway's in-flight requests, then stops);
- a successor that is not ready when its predecessor has less than `lead / 2` left: said once, with the
  scheduler's reason; the predecessor serves until its walltime ends.
`lead` is the larger of --lead and 1.5 x the slowest submit-to-ready time seen so far (+30 s), the latter
at most half the walltime.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aegis.config.resolve import Resolved
from aegis.config.schema import walltime_seconds
from aegis.errors import AegisError
from aegis.launch.endpoints import RunState
from aegis.run import Run, submit
from aegis.schedulers.base import JobInfo
from aegis.serve.chain import Chain, ChainJob, Handover, JobRole, ServiceDir

TICK = 2.0
JOB_POLL = 10.0
LEAD_MARGIN = 30.0
RETRY_BACKOFF = (0.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # before the n-th resubmission after a failure


class Service:
    """Runs one service until its end; every decision is written to service.json and said on `echo`."""

    def __init__(self, res: Resolved, sdir: ServiceDir, until: float, lead: float, gateway_host: str,
                 gateway_port: int, echo: Callable[[str], None]):
        self.res, self.sdir, self.echo = res, sdir, echo
        self.walltime = float(walltime_seconds(res.config.walltime))
        self.min_lead = lead
        self.chain = Chain(config=str(res.source or ""), site=res.site.name, until=until, lead=lead,
                           walltime=self.walltime, pid=os.getpid(), host=socket.gethostname(),
                           key_file=str(sdir.key))
        self.gateway_host, self.gateway_port = gateway_host, gateway_port
        self.gateway: subprocess.Popen | None = None
        self.stop_asked = False
        self.last_poll: dict[int, float] = {}
        self.job_state: dict[int, JobInfo] = {}  # index -> the scheduler's last word on the job
        self.told: set[str] = set()
        self.failures = 0
        self.next_submit = 0.0
        self.variants = (res, shifted_ports(res))  # consecutive jobs alternate: a successor may share a node

    # -- bookkeeping ---------------------------------------------------------------------

    def say(self, msg: str) -> None:
        self.echo(f"aegis serve: {msg}")

    def note(self, key: str, msg: str) -> None:
        """Say something once (per key) and keep it in the record."""
        if key not in self.told:
            self.told.add(key)
            self.chain.notes.append(time.strftime("%H:%M:%S ") + msg)
            self.say(msg)

    def save(self) -> None:
        self.sdir.write(self.chain)
        live = [j.run_dir for j in self.chain.jobs if j.role != JobRole.ENDED]
        self.sdir.write_runs(live)

    @property
    def lead(self) -> float:
        startups = [j.ready - j.submitted for j in self.chain.jobs if j.ready]
        seen = 1.5 * max(startups) + LEAD_MARGIN if startups else 0.0
        # A job held long in the queue once must not make every later job hand over as soon as it is ready.
        return max(self.min_lead, min(seen, self.walltime / 2))

    def jobs(self, *roles: JobRole) -> list[ChainJob]:
        return [j for j in self.chain.jobs if j.role in roles]

    # -- the gateway ---------------------------------------------------------------------

    def start_gateway(self) -> None:
        self.sdir.write_runs([])
        argv = [sys.executable, "-m", "aegis", "gateway", "--runs-file", str(self.sdir.runs), "--key-file",
                str(self.sdir.key), "--host", self.gateway_host, "--port", str(self.gateway_port),
                "--info", str(self.sdir.gateway_info)]
        self.sdir.gateway_info.unlink(missing_ok=True)
        with open(self.sdir.path / "gateway.log", "ab") as out:
            self.gateway = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.sdir.gateway_info.exists():
            if self.gateway.poll() is not None or time.monotonic() > deadline:
                tail = (self.sdir.path / "gateway.log").read_text().strip().splitlines()[-1:]
                raise AegisError(f"the gateway did not start: {tail[0] if tail else 'no output'}")
            time.sleep(0.1)
        self.chain.gateway = json.loads(self.sdir.gateway_info.read_text())["url"]
        self.say(f"gateway {self.chain.gateway} (key: {self.sdir.key})")

    def stop_gateway(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(20)
            except subprocess.TimeoutExpired:
                self.gateway.kill()

    # -- jobs ----------------------------------------------------------------------------

    def submit_job(self, why: str) -> ChainJob:
        index = len(self.chain.jobs) + 1
        run = submit(self.variants[(index - 1) % 2], self.sdir.job_dir(index))
        job = ChainJob(index=index, run_dir=str(run.path), job_id=run.job_id, why=why, submitted=time.time(),
                       nodes=self.res.plan.nodes_required)
        self.chain.jobs.append(job)
        self.save()
        self.say(f"job {index} ({run.job_id}) submitted: {why}")
        return job

    def refresh(self, job: ChainJob, now: float) -> None:
        """Move one job's role on from its endpoints file and (every JOB_POLL s) the scheduler's view."""
        run = Run(job.run_dir, site=self.res.site)
        doc = run.endpoints()
        if doc is not None and doc.started and job.started is None:
            job.started = doc.started
            job.walltime_end = doc.started + self.walltime
        if doc is not None and job.role == JobRole.QUEUED and doc.state == RunState.READY:
            job.role, job.ready = JobRole.SERVING, now
            self.say(f"job {job.index} ready after {now - job.submitted:.0f} s; serving through "
                     f"{self.chain.gateway}")
        if doc is not None and doc.state.finished and job.role != JobRole.ENDED:
            self.end(job, now, "handed over" if job.role == JobRole.DRAINING else self._why_ended(job, run, doc, now))
            return
        if doc is not None and doc.state == RunState.STOPPING and job.role == JobRole.SERVING:
            # Stopping without aegis asking (its walltime, scancel): it serves nothing any more, and its head may
            # be killed before it writes `stopped`.
            self.end(job, now, self._why_ended(job, run, doc, now))
            return
        if now - self.last_poll.get(job.index, 0.0) < JOB_POLL:
            return
        self.last_poll[job.index] = now
        try:
            info = run.job()
        except AegisError:
            return
        self.job_state[job.index] = info
        if info.state.finished and job.role != JobRole.ENDED:
            if job.role == JobRole.DRAINING:
                self.end(job, now, "handed over")
            else:
                self.end(job, now, f"the job ended: {info.state.value}" + (f" ({info.reason})" if info.reason
                                                                              else ""))

    def _why_ended(self, job: ChainJob, run: Run, doc, now: float) -> str:
        """Why a run ended that aegis did not end: the scheduler's word if it has one, else the run's."""
        try:
            info = run.job()
        except AegisError:
            info = None
        if info is not None and info.state.finished:
            return f"the job ended: {info.state.value}" + (f" ({info.reason})" if info.reason else "")
        if job.walltime_end and now >= job.walltime_end - 2 * TICK - JOB_POLL:
            return "its walltime ended (timeout)"
        error = next((i.error for i in doc.instances if i.error), None)
        return f"its run {doc.state.value}" + (f" ({error})" if error else "")

    def end(self, job: ChainJob, now: float, reason: str) -> None:
        unplanned = job.role != JobRole.DRAINING and not self.stop_asked and "timeout" not in reason
        job.role, job.ended, job.end_reason = JobRole.ENDED, now, reason
        for h in self.chain.handovers:
            if h.old == job.index and h.old_ended is None:
                h.old_ended = now
                new = self.chain.jobs[h.new - 1]
                h.overlap_node_hours = new.nodes * max(0.0, now - (new.started or h.at)) / 3600.0
                if job.walltime_end:
                    h.old_walltime_left = max(0.0, job.walltime_end - now)
        self.say(f"job {job.index} ended ({reason}); {job.node_hours:.3f} node-hours")
        if unplanned:
            self.failures += 1
            self.next_submit = now + RETRY_BACKOFF[min(self.failures, len(RETRY_BACKOFF)) - 1]

    def count_tokens(self, job: ChainJob) -> None:
        """Generated tokens of a job's engines (vLLM's counter), read just before aegis stops it."""
        job.tokens = generated_tokens(Run(job.run_dir, site=self.res.site))

    def handover(self, old: ChainJob, new: ChainJob, now: float) -> None:
        self.count_tokens(old)
        old.role = JobRole.DRAINING
        self.chain.handovers.append(Handover(old=old.index, new=new.index, at=now))
        Run(old.run_dir, site=self.res.site).shutdown(timeout=0)  # its head drains the gateway, then stops
        left = f"{old.walltime_end - now:.0f} s of walltime left" if old.walltime_end else ""
        self.say(f"handover job {old.index} -> job {new.index}: job {old.index} drains and stops ({left})")

    # -- the loop ------------------------------------------------------------------------

    def step(self, now: float) -> None:
        for job in self.jobs(JobRole.QUEUED, JobRole.SERVING, JobRole.DRAINING):
            self.refresh(job, now)
        serving = self.jobs(JobRole.SERVING)
        queued = self.jobs(JobRole.QUEUED)
        if len(serving) > 1:  # a successor is ready: the older ones hand over to it
            newest = max(serving, key=lambda j: j.index)
            for old in serving:
                if old is not newest:
                    self.handover(old, newest, now)
            serving = [newest]
        if queued:
            if serving:
                self._late(queued[0], serving[0], now)
            return  # never more than one spare
        if now < self.next_submit:
            return
        if not serving:
            self.submit_job("initial" if not self.chain.jobs else "replacement (nothing is serving)")
            return
        cur = serving[0]
        if cur.walltime_end and cur.walltime_end - now < self.lead and cur.walltime_end < self.chain.until:
            self.submit_job(f"successor of job {cur.index} (it ends in {cur.walltime_end - now:.0f} s)")

    def _late(self, spare: ChainJob, cur: ChainJob, now: float) -> None:
        """Say once when the successor will not be ready before its predecessor's walltime ends."""
        left = (cur.walltime_end or now + 1e9) - now
        if left >= self.lead / 2:
            return
        info = self.job_state.get(spare.index)
        why = (f"still {info.state.value}" + (f" ({info.reason})" if info.reason else "")) if info else "not ready"
        self.note(f"late-{spare.index}", f"successor job {spare.index} is {why}; job {cur.index} serves until its "
                  f"walltime ends in {left:.0f} s, then nothing serves until job {spare.index} is ready")

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *a: setattr(self, "stop_asked", True))
        self.start_gateway()
        self.chain.state = "serving"
        self.save()
        try:
            while not self.stop_asked:
                now = time.time()
                if now >= self.chain.until:
                    self.say("the service's end time has come")
                    break
                if self.sdir.stop.exists():
                    self.say("stop requested")
                    break
                self.step(now)
                self.save()
                time.sleep(TICK)
        finally:
            self.stop_asked = True
            self.finish()
        return 0

    def finish(self) -> None:
        self.chain.state = "stopping"
        self.save()
        for job in self.jobs(JobRole.QUEUED, JobRole.SERVING, JobRole.DRAINING):
            run = Run(job.run_dir, site=self.res.site)
            doc = run.endpoints()
            if job.role == JobRole.QUEUED and doc is None:
                try:
                    run.cancel()
                except AegisError as exc:
                    self.say(f"cannot cancel job {job.index}: {exc}")
                self.end(job, time.time(), "service stopped (cancelled while queued)")
                continue
            if job.role == JobRole.SERVING:
                self.count_tokens(job)
            try:
                run.shutdown(timeout=max(120.0, self.res.config.shutdown_grace + 60.0))
            except AegisError as exc:
                self.say(str(exc))
            self.end(job, time.time(), "service stopped")
        self.stop_gateway()
        self.chain.state = "ended"
        self.save()
        self.sdir.stop.unlink(missing_ok=True)
        rate = self.chain.tokens_per_node_hour()
        self.say(f"ended: {len(self.chain.jobs)} job(s), {len(self.chain.handovers)} handover(s), "
                 f"{self.chain.node_hours:.3f} node-hours ({self.chain.overlap_node_hours:.3f} in overlaps)"
                 + (f", {rate:,.0f} generated tokens per node-hour" if rate is not None else ""))


def service_path(res: Resolved) -> Path:
    """RUNS_DIR/<time>-<name>-service (a new directory, claimed atomically)."""
    from aegis.run import default_run_dir
    from aegis.rundir import claim

    base = default_run_dir(res.config)
    return claim(base.with_name(base.name + "-service"))


def shifted_ports(res: Resolved) -> Resolved:
    """`res` with every port range moved past the plan's ports (or below them when that passes 65535)."""
    from aegis.config.resolve import resolved

    ports = [inst.port for inst in res.plan.instances]
    shift = ((max(ports) - min(ports)) // 100 + 1) * 100
    cfg = res.config
    if max(ports) + shift > 65535:
        shift = -shift
    moved = cfg.model_copy(update={"port_start": cfg.port_start + shift, "models": [
        m.model_copy(update={"port_start": m.port_start + shift}) if m.port_start is not None else m
        for m in cfg.models]})
    return resolved(moved, res.site, nodes=cfg.nodes, source=res.source)


def generated_tokens(run: Run) -> int | None:
    """The sum of vLLM's generation-token counter over a run's ready instances (None: none answered)."""
    import urllib.request

    from aegis.bench.prom import parse_metrics
    from aegis.util.apikey import auth_headers

    doc = run.endpoints()
    if doc is None:
        return None
    key = doc.api_key()
    total, seen = 0.0, False
    for inst in doc.ready_instances():
        try:
            req = urllib.request.Request(inst.url + "/metrics", headers=auth_headers(key))
            with urllib.request.urlopen(req, timeout=5) as resp:
                value = parse_metrics(resp.read().decode()).get("generation_tokens_total")
        except (OSError, ValueError):
            continue
        if value is not None:
            total, seen = total + value, True
    return int(total) if seen else None
