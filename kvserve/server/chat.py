"""POST /v1/chat/completions: messages rendered with the model's chat template, a reply out."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from jinja2 import TemplateError

from kvserve.engine.outputs import RequestOutput, TokenLogprob
from kvserve.server.errors import APIError
from kvserve.server.generation import Sample
from kvserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    Delta,
    TopLogprob,
    Usage,
)
from kvserve.server.serving import Endpoint, prompt_logprobs_body


@functools.cache
def _template_arguments(tokenizer_class: type) -> frozenset[str]:
    """Names a template variable may not take: apply_chat_template's own arguments, and `messages`."""
    return frozenset({"messages", *inspect.signature(tokenizer_class.apply_chat_template).parameters})


def render_messages(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool,  # noqa: ANN001
                    continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
                    add_special_tokens: bool = False) -> list[int]:
    """The prompt's token ids: the messages through the model's chat template.

    `template_kwargs` become variables of the template (vLLM's chat_template_kwargs); those that
    would set one of apply_chat_template's own arguments, or the messages, are left out."""
    reserved = _template_arguments(type(tokenizer))
    variables = {k: v for k, v in (template_kwargs or {}).items() if k not in reserved}
    try:
        text = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages], tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **variables)
    except (TemplateError, ValueError) as e:  # the template's own checks (e.g. on the order of roles)
        raise APIError(400, f"messages: the chat template rejected them: {e}", "messages") from None
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


class ChatCompletions(Endpoint):
    id_prefix = "chatcmpl"
    path = "/v1/chat/completions"

    def prompt_token_ids(self, req: ChatCompletionRequest) -> list[list[int]]:
        return [render_messages(self.state.engine.tokenizer, req.messages, req.add_generation_prompt,
                                req.continue_final_message, req.chat_template_kwargs, req.add_special_tokens)]

    def context_tokens(self, req: ChatCompletionRequest, prompts: list[list[int]]) -> list[int] | None:
        """The tokens of the messages before the last user message, when the full prompt begins with
        them as rendered alone (chat templates render a conversation's prefix as its own prefix)."""
        last_user = max((i for i, m in enumerate(req.messages) if m.role == "user"), default=None)
        if last_user is None:
            return None
        before = render_messages(self.state.engine.tokenizer, req.messages[:last_user], False, False,
                                 req.chat_template_kwargs, req.add_special_tokens) if last_user else []
        if prompts[0][:len(before)] != before:
            raise APIError(400, "kv_policy.scope: the chat template does not render the conversation before the "
                                "last user message as a prefix of the prompt, so 'context' cannot be split off",
                           "kv_policy.scope")
        return [len(before)]

    def echo(self, req: ChatCompletionRequest, prompts: list[list[int]]) -> list[str] | None:
        return None if req.echoed_message is None else [req.echoed_message]

    def max_tokens(self, req: ChatCompletionRequest, prompts: list[list[int]]) -> int:
        # OpenAI's default: as many tokens as the context has left
        max_tokens = req.requested_max_tokens or self.state.engine.max_model_len - len(prompts[0])
        self.check_context(prompts, max_tokens, "messages", req.max_tokens_param)
        return max_tokens

    def num_logprobs(self, req: ChatCompletionRequest) -> int | None:
        return (req.top_logprobs or 0) if req.logprobs else None

    def logged_prompt(self, req: ChatCompletionRequest) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in req.messages]

    def response(self, request_id: str, created: int, samples: list[Sample], usage: Usage,
                 req: ChatCompletionRequest) -> ChatCompletionResponse:
        choices = [ChatChoice(index=s.index, message=AssistantMessage(content=(s.echo or "") + s.text),
                              finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                              logprobs=_logprobs(s.logprobs) if req.logprobs else None,
                              token_ids=s.token_ids if req.return_token_ids else None)
                   for s in samples]
        first = samples[0]  # every choice has the one prompt
        return ChatCompletionResponse(
            id=request_id, created=created, model=self.state.model_name, choices=choices, usage=usage,
            prompt_logprobs=None if req.prompt_logprobs is None else prompt_logprobs_body(first.prompt_logprobs),
            prompt_token_ids=first.prompt_ids if req.return_token_ids else None)

    def opening_chunks(self, request_id: str, created: int, samples: list[Sample], req: ChatCompletionRequest
                       ) -> list[ChatCompletionChunk]:
        """The role of each choice, then (with echo) the message it continues."""
        chunks = [self._chunk(request_id, created, ChatChunkChoice(index=s.index, delta=Delta(role="assistant",
                                                                                               content="")),
                              prompt_token_ids=s.prompt_ids if req.return_token_ids else None)
                  for s in samples]
        return chunks + [self._chunk(request_id, created, ChatChunkChoice(index=s.index, delta=Delta(content=s.echo)))
                         for s in samples if s.echo]

    def chunk(self, request_id: str, created: int, sample: Sample, out: RequestOutput, req: ChatCompletionRequest
              ) -> ChatCompletionChunk | None:
        if not (out.text or out.logprobs or out.finished or (req.return_token_ids and out.token_ids)):
            return None  # text held back (a possible stop string, a partial character)
        choice = ChatChunkChoice(index=sample.index, delta=Delta(content=out.text),
                                 logprobs=None if out.logprobs is None else _logprobs(out.logprobs),
                                 finish_reason=out.finish_reason,
                                 token_ids=out.token_ids if req.return_token_ids else None)
        return self._chunk(request_id, created, choice)

    def usage_chunk(self, request_id: str, created: int, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=self.state.model_name, choices=[],
                                   usage=usage)

    def _chunk(self, request_id: str, created: int, choice: ChatChunkChoice,
               prompt_token_ids: list[int] | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=self.state.model_name, choices=[choice],
                                   prompt_token_ids=prompt_token_ids)


def _logprobs(logprobs: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()),
                         top_logprobs=[TopLogprob(token=text, logprob=value, bytes=list(text.encode()))
                                       for _, text, value in lp.top])
        for lp in logprobs])
