"""The engine's errors for a request it cannot take."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the engine cannot serve; `param` names the offending field, `code` (when set) says
    what kind of problem it is, as OpenAI's error codes do."""

    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"
