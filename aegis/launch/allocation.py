"""Find the nodes of the current allocation (batch or interactive): Slurm, PBS, or this machine."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aegis.errors import AegisError
from aegis.schedulers.base import run_command
from aegis.util.fs import atomic_write


@dataclass
class Allocation:
    """The nodes of a job (allocation.json once the head has chosen the site and serving addresses)."""

    scheduler: str  # slurm, pbs or local
    job_id: str | None
    hosts: list[str]
    site: str = ""
    addresses: list[str] = field(default_factory=list)  # per host: where engines listen and clients connect

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Allocation:
        try:
            doc = json.loads(path.read_text())
            return cls(scheduler=doc["scheduler"], job_id=doc.get("job_id"), hosts=list(doc["hosts"]),
                       site=doc.get("site", ""), addresses=list(doc.get("addresses") or doc["hosts"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AegisError(f"{path}: cannot read the allocation record ({type(exc).__name__}: {exc})") from None


def expand_hostlist(text: str) -> list[str]:
    """Slurm host list syntax without scontrol: 'n[1-3,07],gpu01' -> n1 n2 n3 n07 gpu01."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,\[]*)", text):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}{suffix}")
    return hosts


def _unique(items) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def discover(env: Mapping[str, str] | None = None, prefer: str | None = None) -> Allocation:
    """The allocation this process runs in; outside any allocation, this machine alone.

    `prefer` is the site's scheduler: where both kinds of variables are set (PBS emulated on top of
    Slurm), the site decides, not the environment.
    """
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if prefer == "pbs" and env.get("PBS_NODEFILE"):
        nodelist = None
    if nodelist:
        if shutil.which("scontrol"):
            hosts = run_command(["scontrol", "show", "hostnames", nodelist], what="scontrol show hostnames",
                                timeout=30).stdout.split()
        else:
            hosts = expand_hostlist(nodelist)
        return Allocation("slurm", env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"), _unique(hosts))
    nodefile = env.get("PBS_NODEFILE")
    if nodefile:
        try:
            with open(nodefile) as fh:
                hosts = _unique(line.strip() for line in fh if line.strip())
        except OSError as exc:
            raise AegisError(f"cannot read PBS_NODEFILE {nodefile}: {exc.strerror}") from None
        if not hosts:
            raise AegisError(f"PBS_NODEFILE {nodefile} lists no hosts")
        return Allocation("pbs", env.get("PBS_JOBID"), hosts)
    return Allocation("local", None, [socket.gethostname()])


def node_index(hosts: list[str], env: Mapping[str, str] | None = None) -> int:
    """This node's index in `hosts`: by host name, else by the launcher's rank (one rank per node)."""
    env = os.environ if env is None else env
    names = {socket.gethostname(), socket.getfqdn()}
    shorts = {n.split(".")[0] for n in names}
    for i, host in enumerate(hosts):
        if host in names or host.split(".")[0] in shorts:
            return i
    for var in ("SLURM_NODEID", "PALS_NODEID", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PALS_RANKID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    raise AegisError(f"this host ({socket.gethostname()}) is not in the allocation's host list "
                     f"({', '.join(hosts)}) and no launcher rank variable is set")
