"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, never a stack trace.

Every failure the server reports goes through `APIError`; request bodies that fail pydantic
validation become a 400 naming the offending field (`messages.0.role`, `kv_policy.name`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve.server.protocol import ErrorInfo, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=_TYPES.get(self.status, "server_error"),
                                             param=self.param, code=self.code or self.status))

    def response(self) -> Response:
        return Response(self.body().model_dump_json(), status_code=self.status, headers=self.headers,
                        media_type="application/json")


def invalid_request(error: ValueError) -> APIError:
    """A 400 for a ValueError that may carry `param` (the engine's and the policy registry's do) and
    `code` (the engine's context_length_exceeded)."""
    return APIError(400, str(error), getattr(error, "param", None), getattr(error, "code", None))


def from_validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic error of a request body, as a 400 naming its field."""
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    message = str(cause) if isinstance(cause, Exception) else first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {message}")
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_tag(part)]
    param = getattr(cause, "param", None) or (".".join(loc) if loc else None)
    if param is None:
        return APIError(400, f"the request body is invalid: {message}")
    return APIError(400, message if message.startswith(param) else f"{param}: {message}", param)


def _is_union_tag(part: object) -> bool:
    """pydantic names the union member that failed in `loc` ("str", "list[int]", "function-after[...]")."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return from_validation_error(list(exc.errors())).response()

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    async def unexpected(request: Request, exc: Exception) -> Response:
        # Starlette re-raises the exception after this response, so uvicorn logs its traceback
        return APIError(500, "internal server error").response()

    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)
