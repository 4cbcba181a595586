"""The one process-group stopper: SIGTERM each group, wait out a grace period, SIGKILL, wait until gone."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence

PR_SET_PDEATHSIG = 1  # prctl(2)
_libc = None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the process that started it dies (Linux's parent-death signal).

    An engine must not outlive its agent (it would keep serving the run's key unsupervised).
    If the parent is already gone when the child runs this, the child exits at once.
    """
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: nothing to load in the child
    parent = os.getpid()
    libc = _libc

    def set_it() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_it


def signal_group(pgid: int | None, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when the group is gone (or was never there)."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a group we may not signal is still there
        return True


def group_alive(pgid: int | None) -> bool:
    return signal_group(pgid, 0)


def stop_groups(procs: Sequence[subprocess.Popen], grace: float, *, linger: float = 5.0,
                on_kill: Callable[[], None] | None = None) -> None:
    """Stop processes that lead their own process group (started with start_new_session=True).

    SIGTERM to every group, wait up to `grace` seconds for the leaders, SIGKILL the groups of those
    still running (`on_kill` is told first), reap them, SIGKILL whatever the leaders left in their
    groups (engine workers), then wait up to `linger` seconds until every group is gone, so that
    "stopped" means nothing is left. Never signals a group it was not given.
    """
    live = [p for p in procs if p is not None]
    for p in live:
        if p.poll() is None:
            signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in live):
        time.sleep(0.1)
    stubborn = [p for p in live if p.poll() is None]
    if stubborn and on_kill is not None:
        on_kill()
    for p in stubborn:
        signal_group(p.pid, signal.SIGKILL)
    for p in live:
        p.wait()
        signal_group(p.pid, signal.SIGKILL)  # anything the leader left in its group goes too
    deadline = time.monotonic() + linger
    while time.monotonic() < deadline and any(group_alive(p.pid) for p in live):
        time.sleep(0.05)
