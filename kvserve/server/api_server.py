"""`kvserve serve`: the FastAPI app and its uvicorn server.

The engine's step loop runs in its own thread (AsyncEngine), so the event loop only moves bytes.
On SIGTERM uvicorn stops accepting connections and in-flight requests get --shutdown-timeout to
finish; then their sequences are aborted, so each still gets a well-formed response (finish_reason
"abort") before its connection closes, and the process exits 0."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from kvserve.engine.async_engine import AsyncEngine
from kvserve.engine.config import EngineConfig
from kvserve.model.loader import DEFAULT_MODEL
from kvserve.policies.registry import PolicyError, describe_policies, parse_policy
from kvserve.server.admission import Admission
from kvserve.server.auth import BearerAuth
from kvserve.server.body_limit import BodySizeLimit
from kvserve.server.chat import ChatCompletions
from kvserve.server.completions import Completions
from kvserve.server.errors import APIError, install_error_handlers
from kvserve.server.metrics import ServerMetrics
from kvserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from kvserve.server.serving import json_response
from kvserve.server.state import ServerState
from kvserve.server.tokenize import detokenize, tokenize

log = logging.getLogger("kvserve.server")

SHUTDOWN_BACKSTOP_SECONDS = 5.0  # after the drain timeout, how long aborted requests get to send their end


def build_app(state: ServerState, api_key: str | None, max_body_bytes: int) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            state.engine.shutdown()

    app = FastAPI(title="kvserve", lifespan=lifespan)
    install_error_handlers(app)
    completions, chat = Completions(state), ChatCompletions(state)

    @app.post("/v1/completions", response_model=None)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completions.handle(request, body)

    @app.post("/v1/chat/completions", response_model=None)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat.handle(request, body)

    @app.get("/v1/models")
    async def models() -> Response:
        card = ModelCard(id=state.model_name, root=state.model_root, max_model_len=state.engine.max_model_len)
        return json_response(ModelList(data=[card]))

    @app.get("/v1/kv/policies")
    async def policies() -> dict[str, object]:
        return {"object": "list", "default": state.default_policy.model_dump(), "data": describe_policies()}

    @app.post("/tokenize", response_model=None)
    async def tokenize_text(body: TokenizeRequest) -> Response:
        return json_response(tokenize(state, body))

    @app.post("/detokenize", response_model=None)
    async def detokenize_tokens(body: DetokenizeRequest) -> Response:
        return json_response(detokenize(state, body))

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": importlib.metadata.version("kvserve")}

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.is_alive():
            return APIError(503, "the engine loop is not running", code="engine_dead").response()
        return Response(status_code=200)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        """Drop the cached blocks no request holds (vLLM's endpoint): benchmarks start from a cold cache."""
        state.engine.reset_prefix_cache()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)  # added last, so outermost: 401 before reading a body
    return app


def build_state(args: argparse.Namespace, engine_config: EngineConfig) -> ServerState:
    """The engine (it loads the model) and what the handlers share; apart from run_server so that
    deploy/ray_serve builds each replica's app the same way. Raises PolicyError for a bad --kv-policy."""
    default_policy = parse_policy(engine_config.kv_policy)
    engine = AsyncEngine(engine_config)
    admission = Admission(engine, args.max_queue)
    model_name = args.served_model_name or args.model or DEFAULT_MODEL
    return ServerState(engine=engine, admission=admission,
                       metrics=ServerMetrics(engine, admission, model_name), model_name=model_name,
                       model_root=str(engine.engine.runner.folder), default_policy=default_policy,
                       log_prompts=args.log_prompts)


def run_server(args: argparse.Namespace, engine_config: EngineConfig) -> int:
    try:
        state = build_state(args, engine_config)  # loads the model before the port opens
    except PolicyError as e:
        log.error("--kv-policy: %s", e)
        return 2
    app = build_app(state, args.api_key, args.max_body_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_config=None,
                            timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_BACKSTOP_SECONDS)
    _Server(config, state, args.shutdown_timeout).run()
    return 0 if state.engine.error is None else 1


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits for open requests; past the drain timeout, abort them in the engine so they
        # end with a response rather than a cut connection (uvicorn cancels them only as a backstop)
        timer = asyncio.get_running_loop().call_later(self.drain_timeout, self.state.abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own version re-raises the signal after its graceful shutdown, so the process
        # would die of SIGTERM; a drained shutdown is a clean exit
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
