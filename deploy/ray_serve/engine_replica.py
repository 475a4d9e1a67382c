"""KVServeReplica: one kvserve engine and its FastAPI app inside a Ray Serve replica.

The app is kvserve's own (build_state + build_app, the code behind `kvserve serve`), entered
through its lifespan so the engine's step loop runs on this replica's event loop; requests reach it
through `forward`, never over a socket. Responses name the replica in an x-kvserve-replica header,
so clients and tests can see where affinity sent them."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

from ray import serve

from deploy.ray_serve.asgi_call import Message, call_asgi
from deploy.ray_serve.forwarded import ForwardedRequest
from kvserve.cli import add_engine_args, add_serve_args, engine_config
from kvserve.server.api_server import build_app, build_state

REPLICA_HEADER = b"x-kvserve-replica"


def kvserve_serve_parser() -> argparse.ArgumentParser:
    """`kvserve serve`'s flags (its --host and --port mean nothing inside a replica)."""
    parser = argparse.ArgumentParser(prog="kvserve serve (in a Ray Serve replica)", allow_abbrev=False)
    add_engine_args(parser)
    add_serve_args(parser)
    return parser


@serve.deployment(name="KVServeReplica")
class KVServeReplica:
    async def __init__(self, kvserve_args: list[str]) -> None:
        args = kvserve_serve_parser().parse_args(kvserve_args)
        self.state = build_state(args, engine_config(args))  # loads the model
        self.app = build_app(self.state, args.api_key, args.max_body_bytes)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()  # starts the engine loop on this event loop
        self.name = serve.get_replica_context().replica_id.unique_id

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[Message]:
        """kvserve's response to `request`, message by message (call with stream=True)."""
        async for message in call_asgi(self.app, request):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.name.encode())]}
            yield message

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine loop died (kvserve's /health would say 503)."""
        if not self.state.engine.is_alive():
            raise RuntimeError("the kvserve engine loop is not running")

    async def __del__(self) -> None:
        """Ray Serve awaits this when it stops the replica: the engine loop stops, its thread is joined."""
        if hasattr(self, "lifespan"):  # not when the constructor failed
            await self.lifespan.__aexit__(None, None, None)
