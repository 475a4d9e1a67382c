"""The life of a generation request, shared by /v1/completions and /v1/chat/completions.

validate and tokenize -> admit (429 when the queue is full) -> wait for the first output (so an
error the engine finds is still a proper 4xx) -> stream SSE chunks, or collect one JSON body.
A client that disconnects at any point cancels the work, which aborts its engine sequences."""

from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from kvserve.engine.async_engine import EngineDeadError
from kvserve.engine.limits import check_context_length
from kvserve.engine.outputs import RequestOutput, TokenLogprob
from kvserve.engine.sampling_params import SamplingParams
from kvserve.server.errors import APIError, invalid_request
from kvserve.server.generation import Generation, Sample
from kvserve.server.protocol import KVCacheUsage, PromptLogprob, PromptLogprobs, SamplingFields, Usage
from kvserve.server.request_log import CLIENT_CLOSED, RequestLog
from kvserve.server.state import ServerState

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


REQUEST_ID_HEADER = "X-Request-Id"


def json_response(body: BaseModel, headers: dict[str, str] | None = None) -> Response:
    # pydantic writes non-finite floats (a -inf logprob) as null, where json.dumps would fail
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


def sse(payload: BaseModel) -> bytes:
    return f"data: {payload.model_dump_json()}\n\n".encode()


class Endpoint(ABC):
    id_prefix: ClassVar[str]
    path: ClassVar[str]

    def __init__(self, state: ServerState) -> None:
        self.state = state

    # ---- what each endpoint defines ----------------------------------------------------------

    @abstractmethod
    def prompt_token_ids(self, req: Any) -> list[list[int]]:
        """The token ids of each prompt (a 400 naming the field when they cannot be built)."""

    @abstractmethod
    def max_tokens(self, req: Any, prompts: list[list[int]]) -> int:
        """The effective max_tokens, checked against the context length."""

    @abstractmethod
    def num_logprobs(self, req: Any) -> int | None:
        """Alternatives to return per token (None: no logprobs at all)."""

    def echo(self, req: Any, prompts: list[list[int]]) -> list[str] | None:
        """Each prompt's text the response starts with (`echo`); None when it repeats nothing."""
        return None

    def context_tokens(self, req: Any, prompts: list[list[int]]) -> list[int] | None:
        """Per prompt, its tokens before the last user message: what a policy of scope `context` may
        compress (None: the request has no such structure, and the engine refuses that scope)."""
        return None

    def prompt_logprobs(self, req: Any, echo: list[str] | None) -> int | None:
        """Alternatives per prompt token to score the prompt with (None: not scored)."""
        return req.prompt_logprobs

    @abstractmethod
    def logged_prompt(self, req: Any) -> Any:
        """The prompt as it is logged with --log-prompts."""

    @abstractmethod
    def response(self, request_id: str, created: int, samples: list[Sample], usage: Usage,
                 req: Any) -> BaseModel:
        """The non-streamed body."""

    @abstractmethod
    def opening_chunks(self, request_id: str, created: int, samples: list[Sample], req: Any) -> list[BaseModel]:
        """Chunks sent before any token (chat: one carrying the role per choice)."""

    @abstractmethod
    def chunk(self, request_id: str, created: int, sample: Sample, out: RequestOutput, req: Any
              ) -> BaseModel | None:
        """The chunk for one output, or None when it carries nothing to send."""

    @abstractmethod
    def usage_chunk(self, request_id: str, created: int, usage: Usage) -> BaseModel:
        """The final chunk with `choices: []` and the usage."""

    # ---- the shared flow -----------------------------------------------------------------------

    async def handle(self, http: Request, req: SamplingFields) -> Response:
        # vLLM's: the client may name the request, in the body or in an X-Request-Id header
        request_id = f"{self.id_prefix}-{req.request_id or http.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex}"
        log = RequestLog(request_id, self.path, req.stream,
                         prompt=self.logged_prompt(req) if self.state.log_prompts else None)
        status, gen, stream_owns_log = 500, None, False
        try:
            log.generation = gen = self._admit(request_id, req)
            created = int(time.time())
            if req.stream:
                response = await until_disconnected(http, self._open_stream(gen, req, created, log))
                stream_owns_log = True
                return response
            body = await until_disconnected(http, self._collect(gen, req, created))
            status = 200
            return json_response(body, {REQUEST_ID_HEADER: request_id})
        except APIError as e:
            status = e.status
            raise
        except ClientDisconnected:
            status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it
        finally:
            if not stream_owns_log:
                if gen is not None:
                    gen.close(abandoned=status == CLIENT_CLOSED)
                log.finish(status)

    def _admit(self, request_id: str, req: SamplingFields) -> Generation:
        state = self.state
        state.check_model(req.model)
        try:  # the engine's own rules (token ids, context length, sampling ranges): a 400 naming the field
            policy = req.policy or state.default_policy
            prompts = self.prompt_token_ids(req)
            # what a policy of scope `context` may compress, or a shared prefix is made of
            splits = policy.scope == "context" or getattr(policy, "share_prefix", False) is True
            context = self.context_tokens(req, prompts) if splits else None
            if req.truncate_prompt_tokens is not None:  # the last k tokens, as vLLM keeps them
                keep = state.engine.max_model_len if req.truncate_prompt_tokens == -1 else req.truncate_prompt_tokens
                if context is not None:
                    context = [max(0, c - max(0, len(ids) - keep)) for c, ids in zip(context, prompts)]
                prompts = [ids[-keep:] for ids in prompts]
            echo = self.echo(req, prompts)
            logprobs = self.num_logprobs(req)
            max_tokens = self.max_tokens(req, prompts)
            params = SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                min_p=req.min_p, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty, logit_bias=req.token_bias, seed=req.seed,
                stop=req.stop_list, stop_token_ids=list(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
                min_tokens=req.min_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens, allowed_token_ids=req.allowed_token_ids,
                bad_words=list(req.bad_words or ()), logprobs=logprobs,
                prompt_logprobs=self.prompt_logprobs(req, echo))
        except ValueError as e:
            raise invalid_request(e) from None
        return Generation(state.engine, state.admission, state.metrics, request_id, prompts, params, req.n, policy,
                          echo, req.priority, context, req.cache_salt)

    def check_context(self, prompts: list[list[int]], max_tokens: int, prompt_param: str, max_param: str) -> None:
        """The engine's context-length rule for each prompt, naming this endpoint's fields."""
        for ids in prompts:
            check_context_length(len(ids), max_tokens, self.state.engine.max_model_len, prompt_param, max_param)

    async def _collect(self, gen: Generation, req: SamplingFields, created: int) -> BaseModel:
        with engine_errors():
            async for _ in gen.outputs():
                pass
        return self.response(gen.request_id, created, gen.samples, usage(gen), req)

    async def _open_stream(self, gen: Generation, req: SamplingFields, created: int, log: RequestLog) -> Response:
        outputs = gen.outputs()
        with engine_errors():
            first = await anext(outputs)
        stream = _EventStream(self, gen, outputs, first, req, created, log)
        return SSEResponse(stream.events(), on_close=stream.close, headers={REQUEST_ID_HEADER: gen.request_id})


class _EventStream:
    """The SSE body of one streamed request; `close` runs once however the response ends."""

    def __init__(self, endpoint: Endpoint, gen: Generation, outputs: AsyncGenerator[tuple[Sample, RequestOutput]],
                 first: tuple[Sample, RequestOutput], req: SamplingFields, created: int, log: RequestLog) -> None:
        self.endpoint, self.gen, self.outputs, self.first = endpoint, gen, outputs, first
        self.req, self.created, self.log = req, created, log
        self.status = CLIENT_CLOSED

    async def events(self) -> AsyncIterator[bytes]:
        endpoint, rid, created, req = self.endpoint, self.gen.request_id, self.created, self.req
        for chunk in endpoint.opening_chunks(rid, created, self.gen.samples, req):
            if req.continuous_usage:  # the first output is in already, but none of it is sent yet
                chunk.usage = sample_usage(self.gen.samples[chunk.choices[0].index], completion_tokens=0)
            yield sse(chunk)
        try:
            with engine_errors():
                sample, out = self.first
                while True:
                    chunk = endpoint.chunk(rid, created, sample, out, req)
                    if chunk is not None:
                        if req.continuous_usage:
                            chunk.usage = sample_usage(sample, sample.completion_tokens)
                        yield sse(chunk)
                    try:
                        sample, out = await anext(self.outputs)
                    except StopAsyncIteration:
                        break
        except APIError as e:
            # the response has started: the error travels in the stream (as vLLM does)
            self.status = e.status
            yield sse(e.body())
            yield b"data: [DONE]\n\n"
            return
        if self.req.include_usage:
            yield sse(endpoint.usage_chunk(rid, created, usage(self.gen)))
        yield b"data: [DONE]\n\n"
        self.status = 200

    async def close(self) -> None:
        await self.outputs.aclose()
        self.gen.close(abandoned=True)
        self.log.finish(self.status)


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 headers: dict[str, str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette stops iterating the body when the client leaves but does not close it; closing
        # here aborts the engine sequences now rather than whenever the generator is collected
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.on_close()


def prompt_logprobs_body(logprobs: list[TokenLogprob | None]) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token (the first has none) its own logprob and rank and
    its top alternatives', keyed by token id."""
    body: PromptLogprobs = []
    for lp in logprobs:
        if lp is None:
            body.append(None)
            continue
        entry = {str(token_id): PromptLogprob(logprob=value, rank=rank, decoded_token=text)
                 for rank, (token_id, text, value) in enumerate(lp.top, start=1)}
        entry.setdefault(str(lp.token_id), PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=lp.token))
        body.append(entry)
    return body


def sample_usage(sample: Sample, completion_tokens: int) -> Usage:
    """One choice's counts at a chunk (vLLM's continuous usage stats): its prompt and its tokens sent."""
    return Usage.of(len(sample.prompt_ids), completion_tokens, cached_tokens=sample.cached_tokens)


def usage(gen: Generation) -> Usage:
    """OpenAI's counts (each prompt once, every sample's tokens), and the KV bytes of all the
    request's sequences together."""
    kv = [s.kv_usage for s in gen.samples if s.kv_usage is not None]
    kv_cache = None
    if kv:
        kv_cache = KVCacheUsage(policy=gen.policy.name, bytes=sum(u.bytes for u in kv),
                                full_bytes=sum(u.full_bytes for u in kv), peak_bytes=sum(u.peak_bytes for u in kv),
                                footprint_byte_steps=sum(u.footprint_byte_steps for u in kv),
                                full_footprint_byte_steps=sum(u.full_footprint_byte_steps for u in kv))
    return Usage.of(gen.prompt_tokens, gen.completion_tokens, kv_cache, gen.cached_tokens)


@contextmanager
def engine_errors() -> Iterator[None]:
    """Turn the engine's errors into API errors: its validation errors (ValueError with `param`)
    into a 400, a dead engine loop into a 503."""
    try:
        yield
    except EngineDeadError:
        raise APIError(503, "the engine is not running", code="engine_dead") from None
    except ValueError as e:
        raise invalid_request(e) from None


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # the body has been read by now, so the next message is the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass
