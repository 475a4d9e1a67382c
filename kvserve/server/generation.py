"""One API request inside the engine: `n` samples per prompt, each its own engine sequence, their
outputs merged into one stream in the order they are produced.

Leaving `Generation.outputs()` early (the client went away, the server is shutting down) aborts
every sample still running, which returns its pages to the pool."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from kvserve.engine.async_engine import AsyncEngine
from kvserve.engine.outputs import KVUsage, RequestOutput, TokenLogprob
from kvserve.engine.sampling_params import SamplingParams
from kvserve.policies.base import PolicyParams
from kvserve.server.admission import Admission
from kvserve.server.metrics import ServerMetrics

T = TypeVar("T")


@dataclass
class Sample:
    """One choice of the response (`index`) and what it has produced so far."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    echo: str | None = None  # the prompt's text, when the response repeats it before the completion
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # from the first output, when asked for
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, found in the prefix cache
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    kv_usage: KVUsage | None = None
    last_output_time: float | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs or ())
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.prompt_tokens = out.prompt_tokens
        self.cached_tokens = out.num_cached_tokens
        self.completion_tokens = out.completion_tokens
        if out.finished:
            self.finish_reason, self.stop_reason, self.kv_usage = out.finish_reason, out.stop_reason, out.kv_usage


class Generation:
    def __init__(self, engine: AsyncEngine, admission: Admission, metrics: ServerMetrics, request_id: str,
                 prompts: Sequence[list[int]], params: SamplingParams, n: int, policy: PolicyParams,
                 echo: Sequence[str] | None = None, priority: int = 0, context_tokens: Sequence[int] | None = None,
                 cache_salt: str | None = None) -> None:
        """Admit the request (a 429 when the queue is full); nothing runs until `outputs()` is iterated.
        `echo`: each prompt's text, for responses that repeat it; `context_tokens`: each prompt's
        tokens before its last user message (for policies of scope `context`)."""
        self.engine = engine
        self.admission = admission
        self.metrics = metrics
        self.request_id = request_id
        # the engine's ids stay unique even when clients reuse a request_id
        self._engine_prefix = uuid.uuid4().hex
        self.prompts = prompts
        self.policy = policy
        self.priority = priority
        self.context_tokens = context_tokens
        self.cache_salt = cache_salt
        # with a seed, sample i draws from seed + i: reproducible, yet the n samples differ (as in vLLM)
        self.samples = [Sample(p * n + i, p, prompts[p], params if params.seed is None or i == 0
                               else dataclasses.replace(params, seed=params.seed + i),
                               None if echo is None else echo[p])
                        for p in range(len(prompts)) for i in range(n)]
        self.first_output_time: float | None = None
        self._released: set[int] = set()
        admission.admit(policy.name, len(self.samples))

    async def outputs(self) -> AsyncIterator[tuple[Sample, RequestOutput]]:
        metrics = self.metrics
        context = self.context_tokens
        streams = [self.engine.generate(self._engine_id(s), self.prompts[s.prompt_index], s.params, self.policy,
                                        self.priority, None if context is None else context[s.prompt_index],
                                        self.cache_salt)
                   for s in self.samples]
        abandoned = False
        try:
            async for i, out in merge_streams(streams):
                sample = self.samples[i]
                now = time.monotonic()
                if sample.last_output_time is not None:
                    metrics.inter_token(now - sample.last_output_time)
                elif self.first_output_time is None:
                    self.first_output_time = now
                sample.last_output_time = now
                sample.add(out)
                if out.finished:
                    self._release(sample)
                    metrics.finished(self.policy.name, out, sample.params.max_tokens)
                yield sample, out
        except (asyncio.CancelledError, GeneratorExit):
            abandoned = True
            raise
        finally:
            self.close(abandoned)

    def close(self, abandoned: bool) -> None:
        """Give back the admission of every sample that has not finished (again: a no-op).

        Also needed when `outputs()` never started: its own cleanup then never runs."""
        for sample in self.samples:
            if sample.index not in self._released:
                self._release(sample)
                if abandoned:
                    self.metrics.aborted(self.policy.name)

    def _engine_id(self, sample: Sample) -> str:
        return f"{self._engine_prefix}-{sample.index}"

    def _release(self, sample: Sample) -> None:
        self._released.add(sample.index)
        self.admission.release(self.policy.name)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache, each prompt counted once (by its least cached sample)."""
        least: dict[int, int] = {}
        for s in self.samples:
            least[s.prompt_index] = min(least.get(s.prompt_index, s.cached_tokens), s.cached_tokens)
        return sum(least.values())

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.samples)


async def merge_streams(streams: list[AsyncGenerator[T, None]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index.

    On exit (exhausted, error, or closed early) every iterator is closed: pending reads are
    cancelled inside them, so each runs its own cleanup."""
    if len(streams) == 1:  # the usual n = 1: no task and no wait() per item, which cost ~50 us a token
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    pending = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
