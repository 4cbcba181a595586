"""Reads the launcher's endpoints file (or --url flags) and resolves the API key."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from aegis.errors import UsageError
from aegis.rundir import RunDir

ENDPOINTS_FILENAME = RunDir(Path("/")).endpoints.name  # the launcher's file in a run directory


@dataclass
class Endpoint:
    """One OpenAI-compatible server instance that can receive load."""

    name: str
    url: str
    model: str | None = None
    status: str = "ready"
    lora_adapters: list[str] = field(default_factory=list)

    @property
    def metrics_url(self) -> str:
        return self.url + "/metrics"

    def to_json(self) -> dict:
        return {"name": self.name, "url": self.url, "model": self.model,
                "status": self.status, "lora_adapters": list(self.lora_adapters)}


@dataclass
class Fleet:
    """The endpoints of one run plus where its API key file is (if any)."""

    endpoints: list[Endpoint]
    api_key_file: str | None = None
    source: str = "--url"

    def ready(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.status == "ready"]

    def models(self) -> list[str]:
        return sorted({e.model for e in self.ready() if e.model})

    def for_model(self, model: str | None) -> list[Endpoint]:
        """Ready endpoints serving `model` (all ready ones when there is one model)."""
        ready = self.ready()
        if not ready:
            states = ", ".join(f"{e.name}={e.status}" for e in self.endpoints) or "none listed"
            raise UsageError(f"no endpoint is ready in {self.source} ({states}); "
                             "wait for the launcher or pass --url")
        models = self.models()
        if model is None:
            if len(models) > 1:
                raise UsageError(f"{self.source} serves several models ({', '.join(models)}); "
                                 "choose one with --model")
            return ready
        chosen = [e for e in ready if e.model in (None, model) or model in e.lora_adapters]
        if not chosen:
            raise UsageError(f"no ready endpoint serves model {model!r} in {self.source} "
                             f"(models: {', '.join(models) or 'unknown'})")
        return chosen


def normalize_url(url: str) -> str:
    """`host:port` or `http://host:port/v1/` -> `http://host:port` (the server root)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 (a port out of range or not a number raises here)
    except ValueError:  # "http://[::1": an unclosed IPv6 bracket
        raise UsageError(f"invalid endpoint URL {url!r}; expected http://host:port") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"invalid endpoint URL {url!r}; expected http://host:port")
    path = parsed.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{parsed.scheme}://{parsed.netloc}{path}"


def load_endpoints(path: str | os.PathLike) -> Fleet:
    """Read an endpoints file, or `endpoints.json` inside a run directory (through the one reader)."""
    from aegis.launch.endpoints import EndpointsFile

    doc = EndpointsFile.read(path)
    endpoints = [Endpoint(name=i.name, url=normalize_url(i.url), model=i.model or None, status=i.status.value,
                          lora_adapters=list(i.lora_adapters)) for i in doc.instances]
    return Fleet(endpoints=endpoints, api_key_file=doc.api_key_file, source=str(EndpointsFile.path_of(path)))


def fleet_from_urls(urls: list[str], model: str | None = None) -> Fleet:
    """A fleet of explicit URLs (names `url-0`, `url-1`, ...)."""
    eps = [Endpoint(name=f"url-{i}", url=normalize_url(u), model=model) for i, u in enumerate(urls)]
    return Fleet(endpoints=eps, source="--url")
