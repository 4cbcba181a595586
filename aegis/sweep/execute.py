"""Drive a whole sweep: its directory, which points still need to run, and the two run modes.

The sweep directory (default `runs/sweep-<name>`) holds `sweep.json` and one
directory per point (`<label>-<hash>/`, a run directory like `aegis submit`'s).
`--mode inline` runs the points one after another here (this allocation, or the
local site); `--mode jobs` submits one job per point, each running
`aegis sweep-point DIR`, at most `run.max_parallel` at a time, and waits for them.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from aegis.errors import UsageError
from aegis.rundir import RunDir
from aegis.sweep.expand import INLINE_JOB, SPEC_COPY, SWEEP_FILE, Point, run_steps, sweep_document, write_point
from aegis.sweep.runner import Interrupted, PointRunner
from aegis.sweep.spec import SweepSpec
from aegis.sweep.status import ACTIVE, FINISHED, PointState, read_status, write_status
from aegis.util.fs import atomic_write
from aegis.util.tables import format_table


def default_dir(spec: SweepSpec) -> Path:
    return Path("runs") / f"sweep-{spec.name}"


def prepare(spec: SweepSpec, points: list[Point], sweep_dir: Path, resume: bool) -> Path:
    """Create or reopen the sweep directory; refuse to mix results of a different workload."""
    sweep_dir = sweep_dir.absolute()
    doc = sweep_document(spec, points)
    existing = sweep_dir / SWEEP_FILE
    if existing.exists():
        try:
            old = json.loads(existing.read_text())
        except ValueError:
            raise UsageError(f"{existing} is not valid JSON; move it away or choose another --dir") from None
        started = [p["dir"] for p in old.get("points", []) if read_status(sweep_dir / p["dir"])]
        if started and not resume:
            raise UsageError(f"{sweep_dir} already holds results of this sweep ({len(started)} point(s) started); "
                             "add --resume to continue it (finished points are skipped), or choose another --dir")
        if old.get("spec_hash") != doc["spec_hash"]:
            raise UsageError(f"{sweep_dir} was run with a different workload (bench/probe/warm-up/SLO: spec hash "
                             f"{old.get('spec_hash')}, now {doc['spec_hash']}); its results would not compare: "
                             "use another --dir")
    elif resume:
        raise UsageError(f"{sweep_dir} holds no sweep to resume (no sweep.json); run without --resume")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(existing, json.dumps({**doc, "dir": str(sweep_dir)}, indent=2) + "\n")
    return sweep_dir


def _matches(point: Point, names: tuple) -> bool:
    return "all" in names or point.label in names or point.hash in names or point.dirname in names


def select(points: list[Point], sweep_dir: Path, rerun: tuple, retry_failed: bool,
           echo: Callable[[str], None]) -> list[Point]:
    """The points to run now; finished ones are skipped (and said so) unless asked for again."""
    unknown = [n for n in rerun if n != "all" and not any(_matches(p, (n,)) for p in points)]
    if unknown:
        raise UsageError(f"--rerun {unknown[0]}: no configuration of this sweep has that label or hash "
                         "(see --dry-run)")
    todo = []
    for p in points:
        st = read_status(sweep_dir / p.dirname) or {}
        state = st.get("state")
        if state in FINISHED and not _matches(p, rerun) and not (retry_failed and state == PointState.FAILED):
            echo(f"{p.label} ({p.hash}): {state} earlier; skipped" + (f" ({st.get('reason')})" if st.get("reason")
                                                                     else ""))
            continue
        todo.append(p)
    return todo


# --------------------------------------------------------------------------- inline


def run_inline(spec: SweepSpec, todo: list[Point], sweep_dir: Path, echo: Callable[[str], None]) -> list[dict]:
    """Run the points one after another in this allocation (or on this machine)."""
    if not todo:
        return []
    site = todo[0].site
    if site.scheduler != "local":
        from aegis.launch.allocation import discover

        alloc = discover(prefer=site.scheduler)
        need = max(p.plan.nodes_required for p in todo)
        if alloc.scheduler == "local":
            raise UsageError(f"--mode inline runs the points inside one allocation, and this is not one: start "
                             f"an allocation of {need} node(s) (salloc / qsub -I) and run the sweep there, "
                             "or use --mode jobs")
        if need > len(alloc.hosts):
            big = next(p for p in todo if p.plan.nodes_required == need)
            raise UsageError(f"configuration {big.label} needs {need} nodes; this allocation has "
                             f"{len(alloc.hosts)}: allocate more nodes or use --mode jobs")
    steps, results = run_steps(spec), []
    for i, p in enumerate(todo, 1):
        point_dir = write_point(spec, p, sweep_dir, steps=steps)
        status = PointRunner(point_dir, echo, prefix=f"[{i}/{len(todo)}] {p.label} ({p.hash})").run()
        results.append(status)
        if status["state"] == PointState.INTERRUPTED:
            raise Interrupted(f"sweep interrupted during {p.label}; its servers were stopped. Continue with: "
                              f"aegis sweep {spec.path} --resume --dir {sweep_dir}")
    return results


def submit_inline(spec: SweepSpec, points: list[Point], sweep_dir: Path, todo: list[Point],
                  walltime: str | None, echo: Callable[[str], None]) -> str:
    """Submit ONE job, as large as the biggest point, that runs the points inline (`--mode inline --submit`)."""
    import shutil

    from aegis.config.resolve import Resolved, check_paths
    from aegis.config.schema import walltime_seconds
    from aegis.config.sites import save_site
    from aegis.run import render_job

    if not todo:
        raise UsageError("every configuration has finished already; nothing to submit "
                         "(--rerun LABEL|HASH|all or --retry-failed to run some again)")
    for p in todo:
        check_paths(p.config)
    site = points[0].site
    biggest = max(todo, key=lambda p: (p.plan.nodes_required, p.devices))
    per_point = walltime_seconds(biggest.config.walltime)
    if walltime is None:
        total = per_point * len(todo)
        walltime = f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"
    else:
        walltime_seconds(walltime)  # a bad value is a ConfigError naming the format
    job = RunDir(sweep_dir / INLINE_JOB)
    if job.job_id:
        raise UsageError(f"{job.path} already holds a submitted job ({job.job_id}); "
                         f"`aegis status {job.path}`, or cancel it with `aegis cancel {job.path}` first")
    spec_copy = sweep_dir / SPEC_COPY
    sweep_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.path, spec_copy)
    site_file = RunDir(sweep_dir).site
    save_site(site, site_file)
    cfg = biggest.config.model_copy(update={"walltime": walltime, "name": f"sweep-{spec.name}"})
    payload = ["sweep", str(spec_copy), "--mode", "inline", "--resume", "--dir", str(sweep_dir),
               "--site-file", str(site_file), "--site", site.name]
    res = Resolved(config=cfg, site=site, plan=biggest.plan, source=None)
    job.write_inputs(res)  # `aegis status/cancel DIR/inline-job` read these
    job_id = job.submit(job.write_script(render_job(res, job.path, payload=payload)), site.scheduler)
    job_dir = job.path
    echo(f"submitted job {job_id}: {len(todo)} configuration(s) one after another on "
         f"{biggest.plan.nodes_required} node(s), walltime {walltime}; `aegis status {job_dir}`; "
         f"the report appears in {sweep_dir / 'report'} when it is done")
    return job_id


# --------------------------------------------------------------------------- jobs


def _end_of_job(point_dir: Path, info, echo) -> dict:
    """Settle a point whose job has ended: its own status, or why the job ended first."""
    st = read_status(point_dir) or {}
    if st.get("state") in (*FINISHED, PointState.INTERRUPTED):
        return st
    run = RunDir(point_dir)
    log = run.job_log()
    cancelled = info.state.value == "cancelled"
    st.update(state=PointState.INTERRUPTED if cancelled else PointState.FAILED, finished=time.time(),
              reason=f"job {info.job_id} ended ({info.state.value}"
                     + (f", exit code {info.exit_code}" if info.exit_code not in (None, "", "0", "0:0") else "")
                     + ") before the point finished" + (f"; log: {log}" if log else ""))
    write_status(point_dir, st)
    return st


def _say_end(p: Point, st: dict, echo) -> None:
    echo(f"{p.label} ({p.hash}): {st.get('state')}" + (f": {st['reason']}" if st.get("reason") else ""))


def reconcile(points: list[Point], sweep_dir: Path, sched, echo) -> dict[str, Point]:
    """Points whose job an earlier invocation submitted: still queued/running (returned) or ended."""
    pending = {}
    for p in points:
        point_dir = sweep_dir / p.dirname
        st = read_status(point_dir) or {}
        job_id = RunDir(point_dir).job_id
        if st.get("state") in ACTIVE and job_id:
            pending[job_id] = p
    if not pending:
        return {}
    infos = sched.status(list(pending), {j: str(sweep_dir / p.dirname) for j, p in pending.items()})
    active = {}
    for job_id, p in pending.items():
        info = infos[job_id]
        if info.state.finished:
            _say_end(p, _end_of_job(sweep_dir / p.dirname, info, echo), echo)
        else:
            echo(f"{p.label} ({p.hash}): job {job_id} still {info.state.value}")
            active[job_id] = p
    return active


def run_jobs(spec: SweepSpec, points: list[Point], sweep_dir: Path, rerun: tuple, retry_failed: bool,
             wait: bool, echo: Callable[[str], None], poller=None, sched=None) -> list[dict]:
    """One job per point, at most run.max_parallel at a time; with `wait`, until every job has ended.

    Jobs an earlier invocation submitted are waited for, not submitted again.
    """
    from aegis.config.resolve import check_paths
    from aegis.schedulers.base import Poller, get_scheduler

    site = points[0].site
    sched = sched or get_scheduler(site.scheduler)
    active = reconcile(points, sweep_dir, sched, echo)
    busy = {p.hash for p in active.values()}
    queue = [p for p in select(points, sweep_dir, rerun, retry_failed, echo) if p.hash not in busy]
    limit = int(spec.run.get("max_parallel") or (1 if site.scheduler == "local" else len(points)))
    for p in queue:
        check_paths(p.config)
    steps, results = run_steps(spec), []
    poller = poller or Poller(sched)
    try:
        while queue or active:
            while queue and len(active) < limit:
                p = queue.pop(0)
                point_dir = write_point(spec, p, sweep_dir, steps=steps)
                # The record goes first: a job that starts at once replaces it with its own.
                write_status(point_dir, {"state": PointState.SUBMITTED, "submitted": time.time(), "hash": p.hash,
                                         "label": p.label})
                run = RunDir(point_dir)
                try:
                    job_id = run.submit(run.script, sched)
                except BaseException:
                    run.point_status.unlink(missing_ok=True)
                    raise
                echo(f"{p.label} ({p.hash}): submitted job {job_id}")
                active[job_id] = p
            if not wait:
                break
            poller.run_dirs = {j: str(sweep_dir / p.dirname) for j, p in active.items()}
            for job_id, info in poller.poll(list(active)).items():
                if info.state.finished:
                    p = active.pop(job_id)
                    st = _end_of_job(sweep_dir / p.dirname, info, echo)
                    _say_end(p, st, echo)
                    results.append(st)
            if active:
                poller.wait()
    except KeyboardInterrupt:
        raise Interrupted(f"stopped waiting; {len(active)} job(s) still queued or running"
                          + (f" and {len(queue)} not submitted" if queue else "")
                          + f". Wait again with: aegis sweep {spec.path} --mode jobs --resume --dir {sweep_dir}; "
                          f"cancel with: aegis sweep {spec.path} --cancel --dir {sweep_dir}") from None
    if not wait and (active or queue):
        echo(f"{len(active)} job(s) submitted" + (f", {len(queue)} waiting for a free slot (run.max_parallel)"
                                                 if queue else "")
             + f"; collect with: aegis sweep {spec.path} --mode jobs --resume --dir {sweep_dir}")
    return results


def cancel_jobs(points: list[Point], sweep_dir: Path, echo, sched=None) -> int:
    """Cancel every queued or running job of the sweep; their points become interrupted."""
    from aegis.schedulers.base import get_scheduler

    sched = sched or get_scheduler(points[0].site.scheduler)
    n = 0
    for p in points:
        point_dir = sweep_dir / p.dirname
        st = read_status(point_dir) or {}
        job_id = RunDir(point_dir).job_id
        if st.get("state") in ACTIVE and job_id:
            sched.cancel(job_id)
            st.update(state=PointState.INTERRUPTED, reason=f"job {job_id} cancelled by aegis sweep --cancel",
                      finished=time.time())
            write_status(point_dir, st)
            echo(f"{p.label} ({p.hash}): cancelled job {job_id}")
            n += 1
    return n


# --------------------------------------------------------------------------- summary


def summary_lines(points: list[Point], sweep_dir: Path) -> list[str]:
    rows = []
    for p in points:
        st = read_status(sweep_dir / p.dirname) or {}
        s = _summary(sweep_dir / p.dirname)
        rows.append((p.label, p.hash, st.get("state", "not run"),
                     f"{s['output_throughput']:.1f}" if s else "-", f"{s['p95_ttft_ms']:.0f}" if s else "-",
                     (st.get("reason") or "")[:100]))
    return format_table(("CONFIG", "HASH", "STATE", "OUT TOK/S", "P95 TTFT MS", "NOTE"), rows).splitlines()


def _summary(point_dir: Path) -> dict | None:
    try:
        s = json.loads((RunDir(point_dir).bench / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return {"output_throughput": float(s.get("output_throughput", 0.0)),
            "p95_ttft_ms": float(s.get("p95_ttft_ms", 0.0))}
