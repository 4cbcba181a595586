"""Site profiles: where jobs run (scheduler, devices, CPU locality, directives, launcher).

Profiles are YAML files. The shipped ones live in `aegis/config/site_profiles/`; users add
their own with `--site-file PATH` or directories/files listed in
AEGIS_SITE_PATH (colon-separated). A later source overrides an earlier one of
the same name; a profile may start from another with `inherits: NAME`.
"""
from __future__ import annotations

import importlib.resources
import os
import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from aegis.config.schema import Config, check_env_names, load_yaml, suggest, walltime_seconds
from aegis.engines.options import ENGINE_NAMES, SUPPORT, MultinodeBackend
from aegis.errors import ConfigError, SiteError

RANGE_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_ranges(text: str) -> list[int]:
    """'1-3,7' -> [1, 2, 3, 7]."""
    text = str(text).replace(" ", "")
    if not RANGE_RE.match(text):
        raise ValueError(f"{text!r} is not a list of ranges like '0-5,8'")
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
        if hi_i < lo_i:
            raise ValueError(f"range {part!r} runs backwards")
        out.extend(range(lo_i, hi_i + 1))
    return out


def format_ranges(values) -> str:
    """[1, 2, 3, 7] -> '1-3,7'."""
    vals = sorted(set(values))
    parts = []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(parts)


class Domain(BaseModel):
    """A locality domain (socket or NUMA node): the devices in it and the CPU cores near them."""

    model_config = ConfigDict(extra="forbid")
    devices: StrictStr
    cpus: StrictStr

    @field_validator("devices", "cpus", mode="before")
    @classmethod
    def _ranges(cls, v):
        v = str(v) if isinstance(v, int) else v
        if isinstance(v, str):
            parse_ranges(v)
        return v


class ServeAddress(BaseModel):
    """How a node's serving address is derived from its hostname."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["hostname", "template", "interface", "loopback"] = "hostname"
    template: StrictStr | None = None  # e.g. "{short}-hsn0" ({hostname}, {short})
    interface: StrictStr | None = None  # e.g. "hsn0": the IPv4 address of that interface

    @model_validator(mode="after")
    def _needs(self):
        if self.method == "template" and not self.template:
            raise ValueError("method 'template' needs 'template', e.g. \"{short}.hsn.example.org\"")
        if self.method == "interface" and not self.interface:
            raise ValueError("method 'interface' needs 'interface', e.g. hsn0")
        return self

    def address(self, hostname: str) -> str:
        short = hostname.split(".")[0]
        if self.method == "loopback":
            return "127.0.0.1"
        if self.method == "template":
            assert self.template is not None  # _needs(): method 'template' requires a template
            return self.template.format(hostname=hostname, short=short)
        return hostname  # "interface" is resolved on the node itself by the launcher


class Queue(BaseModel):
    """One row of a site's queue table: a queue (or a node-count bin of one) and its limits."""

    model_config = ConfigDict(extra="forbid")
    name: StrictStr  # what the user names (config `queue:`)
    min_nodes: StrictInt = Field(1, gt=0)
    max_nodes: StrictInt | None = Field(None, gt=0)
    max_walltime: StrictStr  # HH:MM:SS or D-HH:MM:SS
    partition: StrictStr | None = None  # slurm: the partition it submits to (default: name); pbs: the -q value
    qos: StrictStr | None = None  # slurm: a QOS it adds (Frontier's debug is a QOS, not a partition)
    pick: bool = True  # False: never chosen by aegis, only checked when the user names it (by request)

    @field_validator("max_walltime")
    @classmethod
    def _walltime(cls, v):
        walltime_seconds(v)
        return v

    def fits(self, nodes: int, seconds: int) -> bool:
        return self.min_nodes <= nodes <= (self.max_nodes or nodes) and seconds <= walltime_seconds(self.max_walltime)

    def describe(self) -> str:
        nodes = f"{self.min_nodes}-{self.max_nodes}" if self.max_nodes else f">={self.min_nodes}"
        return f"{self.name} {nodes} nodes <={self.max_walltime}" + ("" if self.pick else " (on request)")


class Site(BaseModel):
    """A resolved site profile."""

    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    description: StrictStr = ""
    scheduler: Literal["slurm", "pbs", "local"]
    hostname_patterns: list[StrictStr] = Field(default_factory=list)
    devices_per_node: StrictInt | Literal["auto"]
    device_kind: Literal["gpu", "xpu", "cpu"] = "gpu"
    device_names: list[StrictStr] | None = None
    cores_per_device: StrictInt = Field(1, gt=0)  # cpu sites: cores that make one "device"
    device_memory_gb: float | None = Field(None, gt=0)  # memory of one device (cpu sites: RAM / devices)
    visibility_env: dict[StrictStr, StrictStr] = Field(default_factory=dict)  # VAR -> separator
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    domains: list[Domain] = Field(default_factory=list)
    device_cpus: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    max_nodes: StrictInt | None = Field(None, gt=0)
    gpus_directive: bool = False  # slurm: emit --gpus-per-node
    select_suffix: StrictStr = ""  # pbs: appended to -l select=N, e.g. ":system=polaris"
    directives: list[StrictStr] = Field(default_factory=list)
    queues: list[Queue] = Field(default_factory=list)  # the centre's queue table; aegis picks a row or refuses
    account_required: bool = False  # the scheduler rejects jobs without a project (-A / --account)
    setup: list[StrictStr] = Field(default_factory=list)
    local_storage: StrictStr = "/tmp"
    storage_directives: list[StrictStr] = Field(default_factory=list)  # added when weights are staged locally
    engine_versions: dict[StrictStr, StrictStr] = Field(default_factory=dict)  # engine -> version the site provides
    multinode_backends: dict[StrictStr, MultinodeBackend] = Field(default_factory=dict)  # engine -> how it spans nodes
    ray_env: dict[StrictStr, StrictStr] = Field(default_factory=dict)  # for the processes of Ray-backed instances
    engine_workarounds: dict[StrictStr, list[StrictStr]] = Field(default_factory=dict)  # engine -> known issues
    launcher: Literal["srun", "mpiexec", "local"] = "srun"
    launcher_args: list[StrictStr] = Field(default_factory=list)
    # mpiexec: how one step is put on one named host ({host}); used to restart a lost agent on its node
    launcher_host_args: list[StrictStr] = Field(default_factory=lambda: ["--hosts", "{host}"])
    serve_address: ServeAddress = Field(default_factory=ServeAddress)
    aegis_command: StrictStr | None = None
    defaults: dict = Field(default_factory=dict)
    source: StrictStr = "<built-in>"

    @field_validator("multinode_backends")
    @classmethod
    def _backends(cls, v):
        for engine, backend in v.items():
            if engine not in ENGINE_NAMES:
                raise ValueError(f"{engine!r} is not an engine ({', '.join(ENGINE_NAMES)})")
            if backend != "native" and engine not in SUPPORT["multinode_backend"]:
                raise ValueError(f"engine {engine!r} has only its native multi-node mode")
        return v

    @field_validator("engine_workarounds")
    @classmethod
    def _workarounds(cls, v):
        from aegis.engines import get_engine

        for engine, names in v.items():
            if engine not in ENGINE_NAMES:
                raise ValueError(f"{engine!r} is not an engine ({', '.join(ENGINE_NAMES)})")
            known = get_engine(engine).workarounds
            for name in names:
                if name not in known:
                    raise ValueError(f"{name!r} is not a workaround aegis has for {engine} "
                                     f"(it has: {', '.join(known) or 'none'})")
        return v

    @field_validator("visibility_env", "env", "ray_env")
    @classmethod
    def _env_names(cls, v):
        check_env_names(v)
        return v

    @field_validator("hostname_patterns")
    @classmethod
    def _patterns(cls, v):
        for pat in v:
            try:
                re.compile(pat)
            except re.error as exc:
                raise ValueError(f"{pat!r} is not a valid regular expression: {exc}") from None
        return v

    @field_validator("defaults")
    @classmethod
    def _defaults(cls, v):
        allowed = set(Config.model_fields) - {"models", "site"}
        for key in v:
            if key not in allowed:
                raise ValueError(f"{key!r} cannot be a site default{suggest(key, allowed)}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.devices_per_node == "auto":
            return self
        n = self.devices_per_node
        if n <= 0:
            raise ValueError("devices_per_node must be > 0")
        if self.device_names is not None and len(self.device_names) != n:
            raise ValueError(f"device_names has {len(self.device_names)} names for {n} devices")
        seen: list[int] = []
        for dom in self.domains:
            devs = parse_ranges(dom.devices)
            if any(d >= n for d in devs):
                raise ValueError(f"domain devices {dom.devices!r} go past the {n} devices of a node")
            seen.extend(devs)
        if self.domains and sorted(seen) != list(range(n)):
            raise ValueError(f"domains must list each of the {n} devices exactly once")
        for key in self.device_cpus:
            if not key.isdigit() or int(key) >= n:
                raise ValueError(f"device_cpus key {key!r} is not a device index below {n}")
            parse_ranges(self.device_cpus[key])
        return self

    # -- derived facts used by the placement engine ---------------------------------

    @property
    def device_count(self) -> int:
        """devices_per_node as a number: that of a resolved() site ('auto' is filled in there)."""
        n = self.devices_per_node
        assert isinstance(n, int), f"site {self.name}: devices_per_node is 'auto' until resolved()"
        return n

    def resolved(self) -> Site:
        """Fill in 'auto' values from this machine (only the local site uses them)."""
        if self.devices_per_node != "auto":
            return self
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            list(range(os.cpu_count() or 1))
        k = self.cores_per_device
        n = max(1, len(cores) // k)
        groups = [cores[i * k:(i + 1) * k] for i in range(n)]
        data = self.model_dump()
        data["devices_per_node"] = n
        data["device_names"] = [format_ranges(g) for g in groups]
        data["device_cpus"] = {str(i): format_ranges(g) for i, g in enumerate(groups)}
        data["domains"] = [{"devices": f"0-{n - 1}", "cpus": format_ranges(cores[: n * k])}]
        return Site.model_validate(data)

    def device_name(self, index: int) -> str:
        return self.device_names[index] if self.device_names else str(index)

    def domain_list(self) -> list[list[int]]:
        """Device indices per locality domain, in order; one domain when none are given."""
        if not self.domains:
            return [list(range(self.device_count))]
        return [parse_ranges(d.devices) for d in self.domains]

    def queue_row(self, queue: str | None, nodes: int, walltime: str) -> Queue | None:
        """The row of the queue table a job of `nodes` nodes for `walltime` goes to.

        A named queue is checked against its rows; without a name the first row that fits (and may be
        picked) is chosen. None: the site has no table, or the user named a queue it does not list.
        """
        if not self.queues:
            return None
        seconds = walltime_seconds(walltime)
        table = "; ".join(q.describe() for q in self.queues)
        if queue is not None:
            rows = [q for q in self.queues if q.name == queue]
            if not rows:
                return None  # a queue the profile does not list (a reservation, a new queue): passed through
            for row in rows:
                if row.fits(nodes, seconds):
                    return row
            other = next((q for q in self.queues if q.pick and q.fits(nodes, seconds)), None)
            hint = f"use queue {other.name}" if other else "lower nodes or walltime"
            raise ConfigError(f"queue {queue!r} of site {self.name} does not take {nodes} node(s) for {walltime} "
                              f"({table}); {hint}")
        for row in self.queues:
            if row.pick and row.fits(nodes, seconds):
                return row
        raise ConfigError(f"no queue of site {self.name} takes {nodes} node(s) for {walltime} ({table}); "
                          "lower walltime or instances, or name a queue your project may use with queue:")

    def cpus_of_device(self, index: int) -> list[int]:
        """Cores bound to one device: explicit, or an even share of its domain's cores."""
        if str(index) in self.device_cpus:
            return parse_ranges(self.device_cpus[str(index)])
        for dom in self.domains:
            devs = parse_ranges(dom.devices)
            if index in devs:
                cores = parse_ranges(dom.cpus)
                pos, count = devs.index(index), len(devs)
                return cores[pos * len(cores) // count:(pos + 1) * len(cores) // count]
        return []


# --------------------------------------------------------------------------- loading


def _builtin_files() -> list[Path]:
    return sorted(Path(str(importlib.resources.files("aegis.config.site_profiles"))).glob("*.yaml"))


def _path_entries(site_path: str | None) -> list[Path]:
    files: list[Path] = []
    for entry in filter(None, (site_path or "").split(os.pathsep)):
        p = Path(entry).expanduser()
        if p.is_dir():
            files.extend(sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")))
        elif p.is_file():
            files.append(p)
        else:
            raise SiteError(f"AEGIS_SITE_PATH entry {entry} does not exist")
    return files


def _read_profile(path: Path) -> dict:
    try:
        data = load_yaml(path, what="site profile")
    except ConfigError as exc:
        raise SiteError(str(exc)) from None
    data.setdefault("name", path.stem)
    if not isinstance(data["name"], str):
        raise SiteError(f"{path}: name: must be a string")
    data["source"] = str(path)
    return data


def raw_profiles(site_files=(), site_path: str | None = None) -> dict[str, dict]:
    """Every profile's raw data by name: built-in, then AEGIS_SITE_PATH, then --site-file."""
    if site_path is None:
        site_path = os.environ.get("AEGIS_SITE_PATH")
    profiles: dict[str, dict] = {}
    for path in _builtin_files() + _path_entries(site_path) + [Path(f) for f in site_files]:
        if not path.is_file():
            raise SiteError(f"site file {path} does not exist")
        data = _read_profile(path)
        profiles[data["name"]] = data
    return profiles


def _build(name: str, profiles: dict[str, dict], chain=()) -> Site:
    data = dict(profiles[name])
    parent = data.pop("inherits", None)
    if parent is not None:
        if parent in chain or parent == name:
            raise SiteError(f"{data['source']}: inherits: profiles inherit from each other in a loop")
        sibling = Path(data.get("source", "")).parent / f"{parent}.yaml"
        if parent not in profiles and sibling.is_file():  # a parent profile next to this one
            profiles = {**profiles, parent: _read_profile(sibling)}
        if parent not in profiles:
            raise SiteError(f"{data['source']}: inherits: no site named {parent!r}{suggest(parent, profiles)}")
        base = _build(parent, profiles, chain + (name,)).model_dump()
        parent_defaults = base["defaults"]
        base.update(data)
        if isinstance(data.get("defaults"), dict):  # defaults merge; anything else fails validation below
            base["defaults"] = {**parent_defaults, **data["defaults"]}
        data = base
    try:
        return Site.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" + suggest(str(err["loc"][-1]), Site.model_fields) if err["type"] == "extra_forbidden" \
            else err["msg"].removeprefix("Value error, ")
        raise SiteError(f"{data.get('source', name)}: {loc + ': ' if loc else ''}{msg}") from None


def load_site(name: str, site_files=(), site_path: str | None = None) -> Site:
    """The profile called `name`, validated."""
    profiles = raw_profiles(site_files, site_path)
    if name not in profiles:
        raise SiteError(f"no site named {name!r}{suggest(name, profiles)}; known sites: "
                        f"{', '.join(sorted(profiles))} (add one with --site-file or AEGIS_SITE_PATH)")
    return _build(name, profiles)


def all_sites(site_files=(), site_path: str | None = None) -> list[Site]:
    profiles = raw_profiles(site_files, site_path)
    return [_build(n, profiles) for n in sorted(profiles)]


def detect_site(hostname: str | None = None, site_files=(), site_path: str | None = None) -> str | None:
    """The site whose hostname_patterns match this host (user profiles win), or None."""
    names = [hostname] if hostname else list({socket.gethostname(), socket.getfqdn()})
    profiles = raw_profiles(site_files, site_path)
    for name in reversed(list(profiles)):
        for pat in profiles[name].get("hostname_patterns") or []:
            if any(re.search(pat, h) for h in names):
                return name
    return None


def choose_site(requested: str | None, site_files=(), site_path: str | None = None) -> Site:
    """The requested site, else the detected one, else the embedded default `local`."""
    if not requested and len(site_files) == 1:
        requested = _read_profile(Path(site_files[0]))["name"]
    name = requested or detect_site(site_files=site_files, site_path=site_path) or "local"
    return load_site(name, site_files, site_path)


def save_site(site: Site, path) -> None:
    """Write the profile a run used into its run directory (jobs and agents read it back)."""
    import yaml

    from aegis.util.fs import atomic_write

    data = site.model_dump(mode="json", exclude={"source"})
    atomic_write(path, yaml.safe_dump(data, sort_keys=False))


def run_site(run_dir, name: str) -> Site:
    """The site of a run: the profile saved in the run directory, else the named one."""
    from aegis.rundir import RunDir

    saved = RunDir(Path(run_dir)).site
    if saved.exists():
        return load_site(name, site_files=(str(saved),))
    return load_site(name)
