"""The head's replacement agents (AgentKeeper): the launcher argv for one node, the budget per window, failed tries.

Fast: the "launcher" here is the local site's (the command itself), with stand-in agents that exit or sleep.
"""
from __future__ import annotations

import sys
import time

from aegis.config.sites import load_site
from aegis.launch.keeper import AgentKeeper
from aegis.launch.steps import one_node_step


def test_one_node_step_per_launcher():
    """srun(1): --nodelist picks the node, --overlap shares the CPUs the first step still holds there (Slurm
    >= 20.11); mpiexec: the site's host flag (PALS `--hosts`, Aurora's profile)."""
    frontier, aurora = load_site("frontier").resolved(), load_site("aurora").resolved()
    assert one_node_step(frontier, "frontier01234", ["aegis", "agent"]) == [
        "srun", "--nodes=1", "--ntasks=1", "--nodelist=frontier01234", "--overlap", "--kill-on-bad-exit=0",
        "--cpus-per-task=56", "--cpu-bind=none", "aegis", "agent"]
    assert one_node_step(aurora, "x4102c5s2b0n0", ["aegis", "agent"]) == [
        "mpiexec", "-n", "1", "--hosts", "x4102c5s2b0n0", "--ppn", "1", "--cpu-bind", "none", "aegis", "agent"]
    assert one_node_step(load_site("local").resolved(), "me", ["aegis", "agent"]) == ["aegis", "agent"]


def _keeper(tmp_path, argv, max_restarts=2, report_within=30.0) -> tuple[AgentKeeper, list[str]]:
    said: list[str] = []
    keeper = AgentKeeper(load_site("local").resolved(), ["n0", "n1"], argv, lambda name: tmp_path / f"{name}.log",
                         max_restarts, 3600.0, report_within, said.append)
    return keeper, said


def test_a_new_agent_that_reports_is_adopted_and_the_budget_counts_per_node(tmp_path):
    keeper, said = _keeper(tmp_path, [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        note = keeper.lost(1, "its agent on n1 (pid 7) sent no report for 130 s: node or agent lost")
        assert note and "a new agent is starting there (attempt 1 of 2)" in note
        assert keeper.lost(1, "same") == note  # on its way: no second agent
        assert len(keeper.pending) == 1
        keeper.reported(1, 4242)
        assert not keeper.pending and len(keeper.adopted[1]) == 1 and "took over" in said[-1]
        assert not keeper.covers(2) and keeper.lost(0, "n0 lost") and keeper.covers(2)
        assert keeper.lost(1, "again") is not None  # attempt 2 of 2
        keeper.reported(1, 4243)
        assert keeper.lost(1, "and again") is None  # budget spent on n1 ...
        assert "restart budget spent" in keeper.given_up[1]
        assert keeper.budget_left(0, time.monotonic())  # ... not on n0
    finally:
        for proc in keeper.steps():
            proc.kill()
            proc.wait()


def test_a_new_agent_that_fails_is_said_and_retried_after_a_backoff(tmp_path):
    keeper, said = _keeper(tmp_path, [sys.executable, "-c", "print('no such node'); raise SystemExit(3)"])
    assert keeper.lost(0, "lost") is not None
    keeper.pending[0].proc.wait(30)
    note = keeper.lost(0, "lost")  # the try ended without a report: said, and a backoff before the next
    assert "exited 3" in said[-1] and "agent-node0.log" in said[-1]
    assert note == "lost; a new agent is started again shortly" and not keeper.pending
    assert "no such node" in (tmp_path / "agent-node0.log").read_text()
    keeper.not_before[0] = 0.0
    assert keeper.lost(0, "lost") is not None and len(keeper.tries[0]) == 2
    keeper.pending[0].proc.wait(30)
    assert keeper.lost(0, "lost") is None  # failed again, and the budget (2) is spent
    assert "exited 3" in keeper.given_up[0]


def test_a_new_agent_that_never_reports_is_stopped(tmp_path):
    keeper, said = _keeper(tmp_path, [sys.executable, "-c", "import time; time.sleep(60)"], report_within=0.5)
    assert keeper.lost(0, "lost") is not None
    proc = keeper.pending[0].proc
    time.sleep(0.6)
    keeper.lost(0, "lost")
    assert proc.poll() is not None and "sent no report in 0.5 s" in said[-1]
