"""The key guard aegis puts in front of every keyed vLLM instance (vLLM's --middleware), as an ASGI app sees it.

The end-to-end check (every route of a real vLLM server asked without the key) is
tests/launch/test_local_launch.py::test_every_route_of_the_engine_needs_the_key.
"""
import asyncio
import importlib.util

from aegis.engines.vllm import GUARD_DIR, KEY_GUARD


def guard(monkeypatch, key="s3cret"):
    monkeypatch.setenv("VLLM_API_KEY", key)
    module, _, name = KEY_GUARD.partition(".")
    spec = importlib.util.spec_from_file_location(module, f"{GUARD_DIR}/{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # as vLLM's Python imports it: from the folder on PYTHONPATH, no aegis package
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    return getattr(mod, name)(app), reached


def call(g, path, auth=None, kind="http", method="POST"):
    sent = []

    async def send(msg):
        sent.append(msg)

    headers = [(b"authorization", auth.encode())] if auth else []
    asyncio.run(g({"type": kind, "path": path, "method": method, "headers": headers}, None, send))
    return sent


def test_every_route_but_health_needs_the_bearer_key(monkeypatch):
    g, reached = guard(monkeypatch)
    for path in ("/invocations", "/tokenize", "/v1/completions", "/metrics", "/pooling", "/openapi.json"):
        for auth in (None, "Bearer wrong", "Basic s3cret", "s3cret"):
            sent = call(g, path, auth)
            assert sent[0]["status"] == 401 and sent[1]["body"] == b'{"error": "Unauthorized"}', (path, auth)
    assert reached == []
    assert call(g, "/invocations", "Bearer s3cret") == [] and call(g, "/health") == []
    assert call(g, "/v1/models", "bearer s3cret") == []  # the scheme is case-insensitive (RFC 6750)
    assert call(g, "/v1/completions", method="OPTIONS") == []  # CORS preflight carries no credentials
    assert reached == ["/invocations", "/health", "/v1/models", "/v1/completions"]
    assert call(g, "/v1/realtime", kind="websocket") == [{"type": "websocket.close", "code": 1008}]


def test_no_key_no_guard(monkeypatch):
    g, reached = guard(monkeypatch, key="")
    assert call(g, "/invocations") == [] and reached == ["/invocations"]
