"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

The official client maps the HTTP status to an exception class (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError...), so the status matters as much
as the body. A client mistake is never a 500: validation errors are 400 (not FastAPI's 422),
and a GptkitError raised by the engine or the tokenizer (context overflow, bad token id, a
role the template does not know) is a 400 with its one-line message.
"""

from __future__ import annotations

import json
import logging

import h11
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from gptkit.errors import GptkitError

log = logging.getLogger("gptkit.server")

# OpenAI's error types by status; the client only looks at the status, people read the type.
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "server_error"}


class APIError(HTTPException):
    """An error response. A starlette HTTPException, so that FastAPI lets it through unchanged
    even when it is raised while the body is being read (the body-size limit)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.param, self.code = param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    # a message quoting client text may hold a lone surrogate, which UTF-8 JSON cannot carry
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else
                                                             "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the field and the problem, and the field as OpenAI's `param`."""
    def field_path(err: dict) -> list[str]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # pydantic names the union branch it tried ("prompt.list[int].0"): keep the field path only
        return [p for p in loc if "[" not in p and p not in ("str", "int", "function-wrap", "function-after")]

    errors = exc.errors()
    err = errors[0]
    if err.get("type") == "json_invalid":
        return f"invalid JSON body: {err.get('ctx', {}).get('error', 'decode error')}", None
    # a union reports every branch it tried: the deepest error is the one that says what is wrong
    # (messages.0.content.0.text, not "content should be a string")
    err = max((e for e in errors if e["loc"][:2] == err["loc"][:2]), key=lambda e: len(field_path(e)))
    param = ".".join(field_path(err)) or None
    if param is None:  # no body, or not a JSON object (a missing Content-Type reads as raw bytes)
        return "request body: expected a JSON object sent with `Content-Type: application/json`", None
    return f"{param}: {err.get('msg', 'invalid value').removeprefix('Value error, ')}", param


def install_handlers(app: FastAPI) -> None:
    """Turn every failure into an OpenAI-shaped JSON error with the right status."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status_code, exc.detail, exc.param, exc.code, exc.headers)

    @app.exception_handler(HTTPException)  # unknown paths (404), wrong methods (405)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(GptkitError)
    async def _user_error(request: Request, exc: GptkitError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__})")


class JSONErrorProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, whose one reply of its own — a 400 for a request that h11 cannot
    parse (a Content-Length of "abc", a broken request line or header) — comes in OpenAI's error shape
    too, instead of plain text. `gptkit serve` runs uvicorn with it (uvicorn.run(..., http=...))."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_body(400, f"malformed HTTP request: {msg}", code="bad_http_request")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
