"""RequestRelay: the ASGI app of the ingress; it passes each HTTP request on to an engine replica.

It does not parse the OpenAI protocol: it reads the body, derives the affinity key, forwards the
request through a handle whose router honours the key (as the handle's session_id), and replays
the replica's ASGI messages (status, headers, each SSE chunk) to the client as they arrive.
Routes, validation and errors all stay kvserve's; its only own answer is an OpenAI-shaped 503
when no replica could answer."""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.handle import DeploymentHandle

from deploy.ray_serve.affinity import affinity_key
from deploy.ray_serve.asgi_call import Message
from deploy.ray_serve.forwarded import ForwardedRequest
from kvserve.server.errors import APIError

log = logging.getLogger("deploy.ray_serve")


class RequestRelay:
    def __init__(self, replicas: DeploymentHandle, prefix_chars: int) -> None:
        self.replicas = replicas.options(method_name="forward", stream=True)
        self.prefix_chars = prefix_chars

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = bytearray()
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        request = ForwardedRequest.from_scope(scope, bytes(body))
        key = affinity_key(request, self.prefix_chars)
        handle = self.replicas.options(session_id=key) if key else self.replicas
        started = False
        try:
            async for message in handle.remote(request):
                started = started or message["type"] == "http.response.start"
                await send(message)
        except Exception as e:  # the replica died or could not be reached
            if started:
                raise  # too late for a status; the client sees the stream cut
            log.warning("%s %s: no replica answered: %r", request.method, request.path, e)
            error = APIError(503, "no engine replica could serve the request; retry later", code="replica_unavailable")
            await error.response()(scope, receive, send)
