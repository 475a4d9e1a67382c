"""The engine for an asyncio server: the step loop runs in its own thread, so the event loop never
waits on model compute; each request's outputs reach its coroutine through an asyncio queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from kvserve.engine.config import EngineConfig
from kvserve.engine.llm_engine import EngineStats, LLMEngine
from kvserve.engine.outputs import RequestOutput
from kvserve.engine.sampling_params import SamplingParams

log = logging.getLogger("kvserve.engine")


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       kv_policy: Any = None, priority: int = 0, context_tokens: int | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iterator early aborts the request."""
        if not self.is_alive():
            raise EngineDeadError("the engine loop is not running")
        out_queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = out_queue
        # validation runs in the engine thread; its error comes back through the queue
        self._send("add", {"request_id": request_id, "prompt_token_ids": prompt_token_ids, "params": params,
                           "kv_policy": kv_policy, "priority": priority, "context_tokens": context_tokens,
                           "cache_salt": cache_salt})
        finished = False
        try:
            while not finished:
                item = await out_queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def reset_prefix_cache(self) -> None:
        """Drop the prefix cache's blocks no request holds, in the engine thread before its next step."""
        self._send("reset_prefix_cache", None)

    def abort_all(self) -> None:
        """Abort every request being streamed; each still ends with its output (finish_reason "abort")."""
        for request_id in list(self._queues):
            self.abort(request_id)

    def _send(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand items to their requests' queues from the engine thread: one wake-up of the event loop
        for a whole step's outputs, not one per request."""
        if items and self._loop is not None:
            self._loop.call_soon_threadsafe(self._put_all, items)

    def _put_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for request_id, item in items:
            out_queue = self._queues.get(request_id)
            if out_queue is not None:
                out_queue.put_nowait(item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id = payload["request_id"]
                try:
                    self.engine.add_request(**payload)
                except ValueError as e:
                    self._deliver(request_id, e)
            elif kind == "reset_prefix_cache":
                self.engine.reset_prefix_cache()
            else:
                out = self.engine.abort(payload)
                if out is not None:
                    self._deliver(payload, out)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._deliver_all([(out.request_id, out) for out in self.engine.step()])
        except BaseException as e:  # the loop is dead: tell every waiting request, and /health
            log.exception("engine loop died")
            self.error = e
            dead = EngineDeadError(f"engine loop died: {e}")
            self._deliver_all([(request_id, dead) for request_id in list(self._queues)])
