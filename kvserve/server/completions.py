"""POST /v1/completions: a prompt (a string, strings, or token ids) in, text out."""

from __future__ import annotations

from kvserve.engine.limits import check_token_ids
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
from kvserve.server.serving import Endpoint, prompt_logprobs_body

DEFAULT_MAX_TOKENS = 16  # OpenAI's, for a completion request that gives none


class Completions(Endpoint):
    id_prefix = "cmpl"
    path = "/v1/completions"

    def prompt_token_ids(self, req: CompletionRequest) -> list[list[int]]:
        prompts = req.prompts()
        if isinstance(prompts[0], str):
            encoded = self.state.engine.tokenizer(prompts, add_special_tokens=req.add_special_tokens)
            prompts = [list(ids) for ids in encoded["input_ids"]]
        if any(not ids for ids in prompts):
            raise APIError(400, "prompt: a prompt tokenizes to nothing", "prompt")
        for ids in prompts:
            check_token_ids("prompt", ids, self.state.engine.model_config.vocab_size)
        return prompts  # type: ignore[return-value]

    def max_tokens(self, req: CompletionRequest, prompts: list[list[int]]) -> int:
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        self.check_context(prompts, max_tokens, "prompt", "max_tokens")
        return max_tokens

    def num_logprobs(self, req: CompletionRequest) -> int | None:
        return req.logprobs

    def echo(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str] | None:
        if not req.echo:
            return None
        # a text prompt is repeated as sent; a token-id prompt, or a truncated one, as its decoded text
        as_sent = req.truncate_prompt_tokens is None
        return [p if isinstance(p, str) and as_sent else self.state.engine.tokenizer.decode(ids)
                for p, ids in zip(req.prompts(), prompts)]

    def prompt_logprobs(self, req: CompletionRequest, echo: list[str] | None) -> int | None:
        # an echo with logprobs shows its prompt tokens' logprobs too
        asked = [n for n in (req.prompt_logprobs, req.logprobs if echo is not None else None) if n is not None]
        return max(asked, default=None)

    def logged_prompt(self, req: CompletionRequest) -> str | list[str] | list[int] | list[list[int]]:
        return req.prompt

    def response(self, request_id: str, created: int, samples: list[Sample], usage: Usage,
                 req: CompletionRequest) -> CompletionResponse:
        choices = [CompletionChoice(index=s.index, text=(s.echo or "") + s.text, finish_reason=s.finish_reason,
                                    stop_reason=s.stop_reason,
                                    logprobs=None if req.logprobs is None else self._logprobs(s, s.logprobs, 0, True),
                                    prompt_logprobs=None if req.prompt_logprobs is None
                                    else prompt_logprobs_body(s.prompt_logprobs),
                                    prompt_token_ids=s.prompt_ids if req.return_token_ids else None,
                                    token_ids=s.token_ids if req.return_token_ids else None)
                   for s in samples]
        return CompletionResponse(id=request_id, created=created, model=self.state.model_name, choices=choices,
                                  usage=usage)

    def opening_chunks(self, request_id: str, created: int, samples: list[Sample], req: CompletionRequest
                       ) -> list[CompletionChunk]:
        return []

    def chunk(self, request_id: str, created: int, sample: Sample, out: RequestOutput, req: CompletionRequest
              ) -> CompletionChunk | None:
        # the echoed prompt and the prompt's token ids go out with the first output, whatever it holds
        first = sample.completion_tokens == len(out.token_ids)
        echo_now = sample.echo is not None and first
        if not (out.text or out.logprobs or out.finished or echo_now or (req.return_token_ids and out.token_ids)):
            return None  # text held back (a possible stop string, a partial character)
        logprobs = None
        if out.logprobs is not None:
            logprobs = self._logprobs(sample, out.logprobs, len(sample.text) - len(out.text), echo_now)
        choice = CompletionChoice(index=sample.index, text=(sample.echo if echo_now else "") + out.text,
                                  logprobs=logprobs, finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                                  prompt_token_ids=sample.prompt_ids if req.return_token_ids and first else None,
                                  token_ids=out.token_ids if req.return_token_ids else None)
        return CompletionChunk(id=request_id, created=created, model=self.state.model_name, choices=[choice])

    def usage_chunk(self, request_id: str, created: int, usage: Usage) -> CompletionChunk:
        return CompletionChunk(id=request_id, created=created, model=self.state.model_name, choices=[],
                               usage=usage)


    def _logprobs(self, sample: Sample, logprobs: list[TokenLogprob], offset: int, with_echo: bool
                  ) -> CompletionLogprobs:
        """OpenAI's legacy format, from `offset` in the completion's text; `with_echo` puts the echoed
        prompt's tokens first (the first with no logprob, as it has no context).
        `top_logprobs` always includes the token itself, as OpenAI's does."""
        result = CompletionLogprobs()
        if sample.echo is not None:
            offset += len(sample.echo)  # the completion's text follows the echoed prompt
            if with_echo:
                first_token = self.state.engine.tokenizer.decode(sample.prompt_ids[:1])
                result.tokens.append(first_token)
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                result.text_offset.append(0)
                _append(result, sample.prompt_logprobs[1:], len(first_token), sample.params.logprobs)
        _append(result, logprobs, offset, sample.params.logprobs)
        return result


def _append(result: CompletionLogprobs, logprobs: list[TokenLogprob], offset: int, alternatives: int) -> None:
    """Each token with its first `alternatives` alternatives (a prompt token may have been scored with
    more, for prompt_logprobs)."""
    for lp in logprobs:
        result.tokens.append(lp.token)
        result.token_logprobs.append(lp.logprob)
        top = {text: value for _, text, value in lp.top[:alternatives]}
        top.setdefault(lp.token, lp.logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(lp.token)
