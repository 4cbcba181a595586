"""When a job may start: after other jobs end (any way, or successfully) and not before a given time."""
from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable
from dataclasses import dataclass

from aegis.config.schema import walltime_seconds
from aegis.errors import UsageError

NOW_PLUS_RE = re.compile(r"^now\+(.+)$")
BEGIN_FORMS = "YYYY-MM-DDTHH:MM[:SS] (local time) or now+[D-]HH:MM:SS"


@dataclass(frozen=True)
class StartAfter:
    """The start conditions of one submission; each backend renders them as its own directives.

    after_any: job ids that must have ended, however (Slurm/PBS `afterany`); after_ok: job ids that must
    have completed with exit status 0 (`afterok`); begin: local time before which the job may not start.
    """

    after_any: tuple[str, ...] = ()
    after_ok: tuple[str, ...] = ()
    begin: _dt.datetime | None = None

    def __bool__(self) -> bool:
        return bool(self.after_any or self.after_ok or self.begin)

    def dependency_list(self, check: Callable[[str], str]) -> str:
        """'afterany:A:B,afterok:C' ('' when none), each id passed through `check`: the same syntax in
        sbatch(1) --dependency (',' = all must hold) and qsub.1B -W depend=<type>:<job ID>[:<job ID>...],..."""
        return ",".join(f"{kind}:{':'.join(map(check, ids))}"
                        for kind, ids in (("afterany", self.after_any), ("afterok", self.after_ok)) if ids)


def parse_begin(text: str, now: _dt.datetime | None = None) -> _dt.datetime:
    """'2026-12-04T14:30[:05]' (local; an offset is converted to local time) or 'now+HH:MM:SS' -> a naive local
    time, whole seconds (both schedulers take seconds at most)."""
    now = now or _dt.datetime.now()
    m = NOW_PLUS_RE.match(text.strip())
    try:
        if m:
            when = now + _dt.timedelta(seconds=walltime_seconds(m.group(1)))
        else:
            when = _dt.datetime.fromisoformat(text.strip())
            if len(text.strip()) <= len("YYYY-MM-DD"):
                raise ValueError(text)  # a date alone: say the time too
            if when.tzinfo is not None:
                when = when.astimezone().replace(tzinfo=None)
    except ValueError:
        raise UsageError(f"--begin {text!r}: not a time; give {BEGIN_FORMS}") from None
    return when.replace(microsecond=0)
