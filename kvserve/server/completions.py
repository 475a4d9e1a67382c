"""POST /v1/completions: a prompt (a string, strings, or token ids) in, text out."""

from __future__ import annotations

from kvserve.engine.outputs import RequestOutput, TokenLogprob
from kvserve.server.errors import APIError
from kvserve.server.generation import Sample
from kvserve.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from kvserve.server.serving import Endpoint

DEFAULT_MAX_TOKENS = 16  # OpenAI's, for a completion request that gives none


class Completions(Endpoint):
    id_prefix = "cmpl"
    path = "/v1/completions"

    def prompt_token_ids(self, req: CompletionRequest) -> list[list[int]]:
        prompts = req.prompts()
        if isinstance(prompts[0], str):
            prompts = [list(ids) for ids in self.state.engine.tokenizer(prompts)["input_ids"]]
        if any(not ids for ids in prompts):
            raise APIError(400, "prompt: a prompt tokenizes to nothing", "prompt")
        vocab = self.state.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for ids in prompts for t in ids):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
        return prompts  # type: ignore[return-value]

    def max_tokens(self, req: CompletionRequest, prompts: list[list[int]]) -> int:
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        self.check_context(prompts, max_tokens, "prompt", "max_tokens")
        return max_tokens

    def num_logprobs(self, req: CompletionRequest) -> int | None:
        return req.logprobs

    def logged_prompt(self, req: CompletionRequest) -> str | list[str] | list[int] | list[list[int]]:
        return req.prompt

    def response(self, request_id: str, created: int, samples: list[Sample], usage: Usage,
                 req: CompletionRequest) -> CompletionResponse:
        choices = [CompletionChoice(index=s.index, text=s.text, finish_reason=s.finish_reason,
                                    stop_reason=s.stop_reason,
                                    logprobs=None if req.logprobs is None else _logprobs(s.logprobs, 0))
                   for s in samples]
        return CompletionResponse(id=request_id, created=created, model=self.state.model_name, choices=choices,
                                  usage=usage)

    def opening_chunks(self, request_id: str, created: int, samples: list[Sample]) -> list[CompletionChunk]:
        return []

    def chunk(self, request_id: str, created: int, sample: Sample, out: RequestOutput) -> CompletionChunk | None:
        if not (out.text or out.logprobs or out.finished):
            return None  # text held back (a possible stop string, a partial character)
        logprobs = None
        if out.logprobs is not None:
            logprobs = _logprobs(out.logprobs, len(sample.text) - len(out.text))
        choice = CompletionChoice(index=sample.index, text=out.text, logprobs=logprobs,
                                  finish_reason=out.finish_reason, stop_reason=out.stop_reason)
        return CompletionChunk(id=request_id, created=created, model=self.state.model_name, choices=[choice])

    def usage_chunk(self, request_id: str, created: int, usage: Usage) -> CompletionChunk:
        return CompletionChunk(id=request_id, created=created, model=self.state.model_name, choices=[],
                               usage=usage)


def _logprobs(logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """OpenAI's legacy format; `top_logprobs` always includes the sampled token, as OpenAI's does."""
    result = CompletionLogprobs()
    for lp in logprobs:
        result.tokens.append(lp.token)
        result.token_logprobs.append(lp.logprob)
        top = {text: value for _, text, value in lp.top}
        top.setdefault(lp.token, lp.logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(lp.token)
    return result
