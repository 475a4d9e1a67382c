"""POST /tokenize and /detokenize (vLLM's): the served model's tokenizer over HTTP, for clients that
count tokens or send token-id prompts. Nothing reaches the engine."""

from __future__ import annotations

from kvserve.server.chat import render_messages
from kvserve.server.errors import APIError
from kvserve.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from kvserve.server.state import ServerState


def tokenize(state: ServerState, req: TokenizeRequest) -> TokenizeResponse:
    state.check_model(req.model)
    tokenizer = state.engine.tokenizer
    if req.messages is not None:
        tokens = render_messages(tokenizer, req.messages, req.add_generation_prompt)
    else:
        tokens = list(tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
    return TokenizeResponse(count=len(tokens), max_model_len=state.engine.max_model_len, tokens=tokens)


def detokenize(state: ServerState, req: DetokenizeRequest) -> DetokenizeResponse:
    state.check_model(req.model)
    vocab = state.engine.model_config.vocab_size
    if any(t >= vocab for t in req.tokens):
        raise APIError(400, f"tokens: token ids must be in [0, {vocab})", "tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(req.tokens))
