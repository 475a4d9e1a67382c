"""KVServeIngress: the deployment behind Ray Serve's HTTP proxy. It holds no logic of its own: its
ASGI app, built on the replica once the handle to the engine replicas exists, is a RequestRelay
mounted at every path, so all of kvserve's routes pass through unchanged."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.routing import Mount

from deploy.ray_serve.asgi_call import ASGIApp
from deploy.ray_serve.relay import RequestRelay


@serve.deployment(name="KVServeIngress")
@serve.ingress()
class KVServeIngress:
    def __init__(self, replicas: DeploymentHandle, prefix_chars: int) -> None:
        self.relay = RequestRelay(replicas, prefix_chars)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return Starlette(routes=[Mount("/", app=self.relay)])
