"""The engine's one error type for a request it cannot take."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the engine cannot serve; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
