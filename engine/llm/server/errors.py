"""OpenAI-style error objects, and the handlers that turn every failure into one.

Clients (the ``openai`` library among them) read ``{"error": {"message", "type", "param",
"code"}}``; a plain-text 500 or a bare HTML page breaks them, so nothing else is sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import InputError, MindsetError, one_line
from engine.llm.types import ParameterError

# pydantic's names for union members ("str", "list[TextPart]", "function-after[...]") are
# not fields: the param a client is told leaves them out.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """An error to send as an OpenAI-style error object."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status, message, kind, param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def encoded(self) -> bytes:
        """The body as bytes; ASCII escapes keep a lone surrogate echoed from the request
        from failing the encoding (a 500 while reporting a 400)."""
        return json.dumps(self.body(), ensure_ascii=True).encode("ascii")

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return ErrorResponse(self, headers)


class ErrorResponse(JSONResponse):
    def __init__(self, error: APIError, headers: Mapping[str, str] | None = None) -> None:
        self.error = error
        super().__init__(error.body(), status_code=error.status, headers=headers)

    def render(self, content: Any) -> bytes:
        return self.error.encoded()


def from_input_error(exc: InputError) -> APIError:
    param = exc.param if isinstance(exc, ParameterError) else None
    return APIError(400, str(exc), param=param)


def validation_param(location: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    for part in location:
        if part == "body" and not parts:
            continue
        text = str(part)
        if not ("[" in text or "-" in text or text in _TYPE_TAGS):
            parts.append(text)
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        # For a union, the member whose type matched says what is wrong, not a type mismatch.
        errors.sort(key=lambda error: str(error.get("type", "")).endswith("_type"))
        first = errors[0] if errors else {}
        param = validation_param(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param:
            message = f"{param}: {message}"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response(exc.headers)

    @app.exception_handler(MindsetError)
    async def mindset_error(_: Request, exc: MindsetError) -> JSONResponse:
        if isinstance(exc, InputError):
            return from_input_error(exc).response()
        return APIError(500, str(exc), kind="server_error").response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette still logs the traceback; the client gets an error object, not text.
        return APIError(500, f"the server failed: {one_line(exc)}",
                        kind="server_error").response()
