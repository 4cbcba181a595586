"""ASGI middleware for vLLM's `--middleware`: every route but /health needs the run's key (VLLM_API_KEY).

vLLM's own --api-key guards only /v1, /v2, /inference and /cohere; /invocations, /tokenize,
/pooling, /score, /rerank, /classify, /metrics and the rest stay open (its cli_args.py says so).
aegis adds this guard to every keyed vLLM instance. Standard library only: it runs in the
engine's Python, which need not have aegis installed.
"""
import hashlib
import hmac
import json
import os

OPEN_PATHS = ("/health",)  # liveness and the health gate's first probe; says nothing about the model


class KeyGuard:
    """Refuse (401) any HTTP or websocket request without `Authorization: Bearer <VLLM_API_KEY>`."""

    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    def _allowed(self, scope) -> bool:
        if scope.get("method") == "OPTIONS" or scope.get("path", "") in OPEN_PATHS:
            return True
        auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            hashlib.sha256(token.strip().encode()).digest(), self.digest or b"")

    async def __call__(self, scope, receive, send):
        if self.digest is None or scope["type"] not in ("http", "websocket") or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return None
        body = json.dumps({"error": "Unauthorized"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return None
