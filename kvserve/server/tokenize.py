"""POST /tokenize and /detokenize (vLLM's): the served model's tokenizer over HTTP, for clients that
count tokens or send token-id prompts. Nothing reaches the engine."""

from __future__ import annotations

from kvserve.engine.limits import check_token_ids
from kvserve.server.chat import render_messages
from kvserve.server.errors import invalid_request
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
    try:
        check_token_ids("tokens", req.tokens, state.engine.model_config.vocab_size)
    except ValueError as e:
        raise invalid_request(e) from None
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(req.tokens))
