"""POST /v1/chat/completions: messages rendered with the model's chat template, a reply out."""

from __future__ import annotations

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
from kvserve.server.serving import Endpoint


def render_messages(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:  # noqa: ANN001
    """The prompt's token ids: the messages through the model's chat template."""
    try:
        encoded = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                add_generation_prompt=add_generation_prompt, return_dict=True)
    except TemplateError as e:  # the template's own checks (e.g. on the order of roles)
        raise APIError(400, f"messages: the chat template rejected them: {e}", "messages") from None
    return list(encoded["input_ids"])


class ChatCompletions(Endpoint):
    id_prefix = "chatcmpl"
    path = "/v1/chat/completions"

    def prompt_token_ids(self, req: ChatCompletionRequest) -> list[list[int]]:
        return [render_messages(self.state.engine.tokenizer, req.messages, add_generation_prompt=True)]

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
        choices = [ChatChoice(index=s.index, message=AssistantMessage(content=s.text), finish_reason=s.finish_reason,
                              stop_reason=s.stop_reason, logprobs=_logprobs(s.logprobs) if req.logprobs else None)
                   for s in samples]
        return ChatCompletionResponse(id=request_id, created=created, model=self.state.model_name,
                                      choices=choices, usage=usage)

    def opening_chunks(self, request_id: str, created: int, samples: list[Sample]) -> list[ChatCompletionChunk]:
        return [self._chunk(request_id, created, ChatChunkChoice(index=s.index, delta=Delta(role="assistant",
                                                                                             content="")))
                for s in samples]

    def chunk(self, request_id: str, created: int, sample: Sample, out: RequestOutput) -> ChatCompletionChunk | None:
        if not (out.text or out.logprobs or out.finished):
            return None  # text held back (a possible stop string, a partial character)
        choice = ChatChunkChoice(index=sample.index, delta=Delta(content=out.text),
                                 logprobs=None if out.logprobs is None else _logprobs(out.logprobs),
                                 finish_reason=out.finish_reason)
        return self._chunk(request_id, created, choice)

    def usage_chunk(self, request_id: str, created: int, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=self.state.model_name, choices=[],
                                   usage=usage)

    def _chunk(self, request_id: str, created: int, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=self.state.model_name, choices=[choice])


def _logprobs(logprobs: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()),
                         top_logprobs=[TopLogprob(token=text, logprob=value, bytes=list(text.encode()))
                                       for _, text, value in lp.top])
        for lp in logprobs])
