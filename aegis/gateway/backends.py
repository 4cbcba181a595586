"""The gateway's view of its runs: which instances may take requests, for which model or adapter, with which key.

A `RunFollower` re-reads one run's endpoints.json and drain.json when either
changes (a stat per poll; both are replaced atomically), and a `Pool` merges
the followers into the routing table the proxy reads. An instance takes new
requests only while its run is live (not stopping, stopped or failed), it is
`ready`, and it is not drained: starting, restarting, unhealthy, draining and
failed instances get none.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from aegis.errors import AegisError, UsageError
from aegis.launch.endpoints import EndpointsFile, InstanceState, RunState
from aegis.rundir import RunDir
from aegis.util.apikey import read_key_file

_LIVE_RUN = (RunState.STARTING, RunState.READY, RunState.DEGRADED)


@dataclass(eq=False)
class Backend:
    """One engine server behind the gateway (an instance of one run)."""

    run: str  # the run directory
    name: str  # the instance name (unique within its run)
    url: str
    model: str
    adapters: tuple[str, ...]
    key: str | None  # the run's key, sent to the engine (never the client's)
    inflight: int = 0
    failed_until: float = 0.0  # monotonic time before which it is skipped after a connection failure

    @property
    def ident(self) -> str:
        return f"{Path(self.run).name}/{self.name}"


def read_drain(run: RunDir) -> tuple[bool, frozenset[str]]:
    """(every instance drained, the drained instance names) from the run's drain.json (none if absent)."""
    try:
        data = json.loads(run.drain.read_text())
    except (OSError, ValueError):
        return False, frozenset()
    if not isinstance(data, dict):
        return False, frozenset()
    return bool(data.get("all")), frozenset(str(x) for x in data.get("instances") or [])


def write_drain(run: RunDir, instances: list[str] | None) -> None:
    """Add instances (None: all of them) to the run's drain set; the head and every gateway read it."""
    from aegis.util.fs import atomic_write

    every, names = read_drain(run)
    if instances is None:
        every = True
    atomic_write(run.drain, json.dumps({"all": every, "instances": sorted(names | set(instances or []))}) + "\n",
                 mode=0o600)


class RunFollower:
    """One run's serving instances, reloaded when its endpoints or drain file changes."""

    def __init__(self, target: str | os.PathLike, pending_ok: bool = False):
        """`pending_ok`: the run may have no endpoints file yet (a queued job of a chain); it serves nothing
        until its head writes one. Otherwise a missing or unreadable file is an error now (one line)."""
        path = EndpointsFile.path_of(target)
        self.path = path
        self.run = RunDir(path.parent)
        self.doc = EndpointsFile() if pending_ok and not path.exists() else EndpointsFile.read(path)
        self.key = self._key(self.doc)
        self.stamp: tuple = ()
        self.backends: list[Backend] = []
        self.drain: tuple[bool, frozenset[str]] = (False, frozenset())  # drain.json as last read
        self.poll()

    def _key(self, doc: EndpointsFile) -> str | None:
        if not doc.api_key_file:
            return None
        return read_key_file(doc.api_key_file)  # UsageError (one line) when unreadable or shared

    def _stamp(self) -> tuple:
        out: list[tuple[int, int, int] | None] = []
        for p in (self.path, self.run.drain):
            try:
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def poll(self) -> bool:
        """Reload if a file changed; True when the serving set may have changed."""
        stamp = self._stamp()
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        doc = EndpointsFile.read_optional(self.path)
        if doc is None:  # vanished or unreadable for a moment: keep the last good view
            return False
        self.doc = doc
        if doc.api_key_file:
            try:
                self.key = self._key(doc)
            except UsageError:
                pass  # keep the key read at start
        self.drain = every, drained = read_drain(self.run)
        old = {b.name: b for b in self.backends}
        self.backends = []
        if doc.state not in _LIVE_RUN or every:
            return True
        for inst in doc.instances:
            if inst.status != InstanceState.READY or inst.name in drained:
                continue
            prev = old.get(inst.name)
            if prev is not None and prev.url == inst.url:
                prev.model, prev.adapters, prev.key = inst.model, tuple(inst.lora_adapters), self.key
                self.backends.append(prev)  # keeps its in-flight count
            else:
                self.backends.append(Backend(str(self.run.path), inst.name, inst.url, inst.model,
                                             tuple(inst.lora_adapters), self.key))
        return True


@dataclass
class Pool:
    """Every run the gateway follows, and the routing table over their serving instances."""

    followers: list[RunFollower]
    runs_file: Path | None = None  # a JSON {"runs": [RUN_DIR, ...]} the set of followed runs is re-read from
    runs_stamp: tuple | None = None
    by_name: dict[str, list[Backend]] = field(default_factory=dict)  # model or adapter -> backends
    adapters: dict[str, str] = field(default_factory=dict)  # adapter -> its base model

    def __post_init__(self) -> None:
        self.rebuild()

    def poll(self) -> bool:
        changed = self._sync_runs()
        for f in self.followers:
            changed |= f.poll()
        if changed:
            self.rebuild()
        return changed

    def _sync_runs(self) -> bool:
        """Follow the runs the runs file lists now (a chain's jobs come and go); True when the set changed."""
        if self.runs_file is None:
            return False
        try:
            st = self.runs_file.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self.runs_stamp:
                return False
            data = json.loads(self.runs_file.read_text())
            wanted = [str(Path(r).absolute()) for r in data.get("runs", [])]
        except (OSError, ValueError, AttributeError, TypeError):
            return False
        self.runs_stamp = stamp
        have = {str(f.run.path.absolute()): f for f in self.followers}
        followers = []
        for r in wanted:
            try:
                followers.append(have.get(r) or RunFollower(r, pending_ok=True))
            except AegisError:
                continue  # not readable (yet): tried again when the runs file changes
        self.followers = followers
        return set(have) != {str(f.run.path.absolute()) for f in followers}

    def rebuild(self) -> None:
        by_name: dict[str, list[Backend]] = {}
        adapters: dict[str, str] = {}
        for f in self.followers:
            for b in f.backends:
                by_name.setdefault(b.model, []).append(b)
                for a in b.adapters:
                    by_name.setdefault(a, []).append(b)
                    adapters[a] = b.model
        self.by_name, self.adapters = by_name, adapters

    def known_models(self) -> list[str]:
        """Every model and adapter any followed run serves or will serve (for the 404 message)."""
        out: set[str] = set()
        for f in self.followers:
            for inst in f.doc.instances:
                out.add(inst.model)
                out.update(inst.lora_adapters)
        return sorted(x for x in out if x)

    def backends(self) -> list[Backend]:
        return [b for f in self.followers for b in f.backends]
