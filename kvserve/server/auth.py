"""The API key: `Authorization: Bearer <key>` on /v1/ routes and /reset_prefix_cache, when the server
has one.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed responses and
hide client disconnects from the handlers."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from kvserve.server.errors import APIError


class BearerAuth:
    """Routes outside /v1/ stay open, as in vLLM: /health and /metrics for probes and scrapers,
    /version, and /tokenize and /detokenize (the tokenizer only; no generation). /reset_prefix_cache
    changes what every request finds cached: it needs the key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] == "/reset_prefix_cache"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            # constant time, so the key cannot be guessed byte by byte from response timings
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
