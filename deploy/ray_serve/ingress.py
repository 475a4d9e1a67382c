"""KVServeIngress: the deployment behind Ray Serve's HTTP proxy; it relays every route to a replica.

It does not parse the OpenAI protocol: it reads the body, derives the affinity key, forwards the
request through a handle whose router honours the key, and replays the replica's ASGI messages
(status, headers, each SSE chunk) to the client as they arrive. Routes, validation and errors all
stay kvserve's."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.routing import Mount

from deploy.ray_serve.affinity import affinity_key
from deploy.ray_serve.asgi_call import ASGIApp, Message
from deploy.ray_serve.forwarded import ForwardedRequest


@serve.deployment(name="KVServeIngress")
@serve.ingress()
class KVServeIngress:
    def __init__(self, replicas: DeploymentHandle, prefix_chars: int) -> None:
        self.replicas = replicas.options(method_name="forward", stream=True)
        self.prefix_chars = prefix_chars

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return Starlette(routes=[Mount("/", app=self.relay)])

    async def relay(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
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
        async for message in handle.remote(request):
            await send(message)
