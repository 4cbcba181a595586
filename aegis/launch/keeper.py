"""Lost agents: the head starts a new agent on the node (or the whole step again), within a restart budget.

An agent is lost when it stops reporting (killed, hung, its node gone) or, on the head's own
node, when its process is gone. Its engines die with it (parent-death signal); a hung agent's
engines are ended by the agent that replaces it (`takeover`). The head asks the launcher for a
new step on that node only (`one_node_step`); where the launcher ended the whole step (mpiexec
aborts every rank when one dies; on the local site the step is the agent), the whole step is
started again. Each node has max_restarts new agents per restart_window (the engines' budget);
then its instances are failed, with the reason.
"""
from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aegis.config.sites import Site
from aegis.launch.steps import one_node_step
from aegis.util.procs import stop_groups

WHOLE_STEP = -1  # the budget key of the whole launcher step


@dataclass
class Attempt:
    """A new agent on its way: its launcher step, when it was started, what the instances say meanwhile."""

    proc: subprocess.Popen
    started: float
    note: str


@dataclass
class AgentKeeper:
    """Replacement agents of one run: who is on the way, who took over, how much budget each node has left."""

    site: Site
    hosts: list[str]
    agent_argv: list[str]
    log: Callable[[str], Path]  # a log file by name (the run directory's logs/)
    max_restarts: int
    window: float
    report_within: float  # seconds a new agent has to send its first report
    echo: Callable[[str], None]
    tries: dict[int, list[float]] = field(default_factory=dict)  # node (or WHOLE_STEP) -> when agents were started
    pending: dict[int, Attempt] = field(default_factory=dict)
    adopted: dict[int, list[subprocess.Popen]] = field(default_factory=dict)  # node -> steps whose agents reported
    given_up: dict[int, str] = field(default_factory=dict)  # node -> why no new agent is started
    not_before: dict[int, float] = field(default_factory=dict)  # backoff after a failed attempt

    def budget_left(self, key: int, now: float) -> bool:
        """Whether another agent may be started for `key`: fewer than max_restarts within the window."""
        recent = [t for t in self.tries.get(key, []) if now - t < self.window]
        self.tries[key] = recent
        return len(recent) < self.max_restarts

    def _count(self, key: int, now: float) -> int:
        self.tries.setdefault(key, []).append(now)
        return len(self.tries[key])

    def lost(self, index: int, why: str) -> str | None:
        """A round saw node `index`'s agent lost: the note its ranks carry while a new agent is on the way,
        or None when there is none (out of budget, or the last one failed: `given_up` says why)."""
        now = time.monotonic()
        attempt = self.pending.get(index)
        if attempt is not None:
            code = attempt.proc.poll()
            if code is None and now - attempt.started < self.report_within:
                return attempt.note
            if code is None:
                stop_groups([attempt.proc], 5.0, linger=0)
            del self.pending[index]
            failed = (f"exited {code}" if code is not None else
                      f"sent no report in {self.report_within:g} s")
            self.echo(f"aegis: the new agent on {self.hosts[index]} {failed}; see {self.log(self._name(index))}")
            self.not_before[index] = now + min(60.0, 2.0 ** len(self.tries.get(index, [])))
            self.given_up[index] = f"{why}; a new agent there {failed} (log: {self.log(self._name(index))})"
        if now < self.not_before.get(index, 0.0):
            return f"{why}; a new agent is started again shortly" if self.budget_left(index, now) else None
        if not self.budget_left(index, now):
            if index not in self.given_up or "budget" not in self.given_up[index]:
                self.given_up[index] = (f"{why}; {self.max_restarts} new agent(s) there within "
                                        f"{self.window:g} s already (restart budget spent)")
                self.echo(f"aegis: not starting another agent on {self.hosts[index]}: {self.given_up[index]}")
            return None
        n = self._count(index, now)
        argv = one_node_step(self.site, self.hosts[index], self.agent_argv)
        with open(self.log(self._name(index)), "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        note = f"{why}; a new agent is starting there (attempt {n} of {self.max_restarts})"
        self.pending[index] = Attempt(proc, now, note)
        self.given_up.pop(index, None)
        self.echo(f"aegis: {why}; starting a new agent on {self.hosts[index]} (attempt {n} of "
                  f"{self.max_restarts}, log {self.log(self._name(index))})")
        return note

    def reported(self, index: int, agent_pid: int) -> None:
        """Node `index` sent a fresh report: a new agent on the way there has taken over."""
        attempt = self.pending.pop(index, None)
        if attempt is not None:
            self.adopted.setdefault(index, []).append(attempt.proc)
            self.echo(f"aegis: the new agent on {self.hosts[index]} (pid {agent_pid}) took over")

    def restart_step(self) -> bool:
        """Whether the whole launcher step may be started again (counted when it may)."""
        now = time.monotonic()
        if not self.budget_left(WHOLE_STEP, now):
            return False
        self._count(WHOLE_STEP, now)
        return True

    def steps(self) -> list[subprocess.Popen]:
        """Every replacement step still to stop with the run."""
        return [p for procs in self.adopted.values() for p in procs] + [a.proc for a in self.pending.values()]

    def covers(self, nodes: int) -> bool:
        """Whether every node has a replacement agent (then the first step's end is expected: the new
        agents ended their hung predecessors)."""
        return all(i in self.pending or i in self.adopted for i in range(nodes))

    @staticmethod
    def _name(index: int) -> str:
        return f"agent-node{index}"
