"""The request body size limit: 413 beyond --max-body-bytes, OpenAI-shaped.

Starlette's own RequestBodyLimitMiddleware answers a too-large announced Content-Length with
plain text, whatever the app's error handlers say; this one reads the body up to the limit
(announced or not), then hands the app the buffered body. Plain ASGI rather than Starlette's
BaseHTTPMiddleware, which would buffer streamed responses and hide client disconnects."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvserve.server.errors import APIError


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before it finished sending
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._reject(scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        # the rest of the body is never read, so the connection cannot be reused
        error = APIError(413, f"the request body is larger than the limit of {self.max_bytes} bytes",
                         code="request_too_large", headers={"Connection": "close"})
        await error.response()(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the buffered body once, then the connection's own messages (the
    disconnect the handlers watch for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
