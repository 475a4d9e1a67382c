"""Run an ASGI app on one forwarded request inside this process, yielding the messages it sends.

This is how an engine replica serves a request with kvserve's own FastAPI app: no HTTP server and
no socket, only the ASGI calls, and each `send` (a response start, an SSE chunk) is yielded as soon
as it is made, so streaming stays streaming across Ray."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from deploy.ray_serve.forwarded import ForwardedRequest

Message = dict[str, Any]
ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]

log = logging.getLogger("deploy.ray_serve")


async def call_asgi(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[Message]:
    """Yield the ASGI messages of `app`'s response to `request`, up to the last body message.

    Leaving the iterator early (the client went away and Ray cancelled the stream) tells the app
    the client disconnected and then cancels it, so kvserve aborts the sequence and frees its pages."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_delivered = False

    async def receive() -> Message:
        nonlocal body_delivered
        if not body_delivered:
            body_delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.put_nowait(message)

    task = asyncio.create_task(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))  # the app ended: no more messages
    try:
        while (message := await messages.get()) is not None:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                return
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            error = (await asyncio.gather(task, return_exceptions=True))[0]
            if isinstance(error, Exception):  # the app already sent its 500, if it could
                log.error("%s %s failed: %r", request.method, request.path, error)
