"""The error shape on the wire, in one place: OpenAI's ``{"error": {message, type, code, param}}``.

Every error a client sees is shaped here, whichever layer raised it:

* ``error_body`` + ``error_status``: any exception. A ``ServeAppError`` (serve_app/errors.py: the
  exception classes, each with its status, type and code) keeps its message; a validation error is
  a 400 naming each bad field (``validation_error_body``); anything else is a 500 with a generic
  message, as its text may hold internals (paths, tensor shapes) that are for the server log.
* ``redact_locations``: tenant-facing messages lose store URIs and local paths (``redact=True``).
* ``http_error_body``: Starlette's own HTTP errors (unknown route, wrong method, a body FastAPI
  could not decode), which FastAPI would answer as ``{"detail"}``.
* ``retry_after_header`` and ``send_error``: for the router's pure-ASGI middleware (auth, body
  size), which answers before any route.

No torch, no Ray: the router's middleware, its exception handlers and the SSE encoder all import it.
"""

from __future__ import annotations

import json
import math
import re
from http import HTTPStatus
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from serve_app.errors import InvalidRequestError, ServeAppError


class ErrorInfo(BaseModel):
    message: str = Field(description="Human-readable explanation.")
    type: str = Field(description="Error class, e.g. 'invalid_request_error'.")
    code: str | None = Field(default=None, description="Machine-readable code, if any.")
    param: str | None = Field(default=None, description="The offending request field, if known.")


class ErrorResponse(BaseModel):
    error: ErrorInfo = Field(description="What went wrong.")


def _loc_to_str(loc: tuple[Any, ...]) -> str:
    # FastAPI prefixes body errors with "body"; clients know the field by its own name.
    if len(loc) > 1 and loc[0] == "body":
        loc = loc[1:]
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_error_body(exc: ValidationError | RequestValidationError) -> dict[str, Any]:
    """OpenAI error body for a failed request validation (HTTP 400).

    The message names each field, e.g. "max_tokens: Input should be greater than or
    equal to 1"; ``param`` is the first offending field.
    """
    messages, first_param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            # FastAPI reports ("body", <char offset>) as the location; say what it is.
            loc, param = (), None
            detail = (err.get("ctx") or {}).get("error", "")
            pos = err.get("loc", (None, None))[-1]
            msg = f"request body is not valid JSON (at character {pos}): {detail}".rstrip(": ")
        else:
            loc = tuple(err.get("loc", ()))
            param = None if loc in ((), ("body",)) else _loc_to_str(loc)
            msg = err.get("msg", "invalid value")
        where = _loc_to_str(loc)
        messages.append(f"{where}: {msg}" if where else msg)
        if first_param is None:
            first_param = param
    body = ErrorInfo(
        message="; ".join(messages) or "invalid request",
        type=InvalidRequestError.error_type,
        code=InvalidRequestError.code,
        param=first_param,
    )
    return ErrorResponse(error=body).model_dump()


# Where a message names a storage location: a URI (s3://bucket/..., file:///...), a Windows
# or home path, or an absolute POSIX path -- but not this API's own routes ("POST
# /admin/adapters", "GET /v1/models"), which messages name as the fix.
_STOP = r"[^\s'\"<>()\[\]{},;]"
_URI_RE = re.compile(rf"\b[A-Za-z][A-Za-z0-9+.\-]*://{_STOP}*")
_PATH_RE = re.compile(
    rf"\b[A-Za-z]:\\{_STOP}*"  # C:\data\x
    rf"|(?<![\w.~/\-])~/{_STOP}*"  # ~/adapters
    rf"|(?<![\w.~/:\-])/(?!(?:v1|admin|health|docs|redoc|openapi\.json)\b)[\w.\-]{_STOP}*"  # /var/x
)


def redact_locations(message: str) -> str:
    """``message`` with store URIs and local paths replaced by ``<uri>`` / ``<path>``.

    Tenant-facing errors go through this: a store's bucket, a cache folder or a node's
    file layout is for the operator's log, not for a tenant.
    """
    return _PATH_RE.sub("<path>", _URI_RE.sub("<uri>", message))


def error_body(exc: BaseException, *, redact: bool = False) -> dict[str, Any]:
    """OpenAI error body for any exception; pair it with ``error_status(exc)``.

    Unexpected exceptions get a generic message: their text may hold internals
    (paths, tensor shapes) that are for the server log, not the client. ``redact``:
    also take store URIs and local paths out of a ServeAppError's message
    (``redact_locations``), for errors sent to tenants rather than operators.
    """
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return validation_error_body(exc)
    if isinstance(exc, ServeAppError):
        message = redact_locations(exc.message) if redact else exc.message
        info = ErrorInfo(message=message, type=exc.error_type, code=exc.code)
    else:
        info = ErrorInfo(message="Internal server error", type="internal_error")
    return ErrorResponse(error=info).model_dump()


def error_status(exc: BaseException) -> int:
    """HTTP status for ``exc``: its own for ServeAppError, 400 for validation, else 500."""
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return 400
    if isinstance(exc, ServeAppError):
        return exc.status_code
    return 500


# ------------------------------------------------------------------ HTTP answers (middleware, handlers)


def retry_after_header(exc: BaseException) -> dict[str, str]:
    """``{"Retry-After": "<whole seconds>"}`` for an error that carries ``retry_after``, else {}."""
    retry = getattr(exc, "retry_after", None)
    if retry is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(retry)))}


_HTTP_ERRORS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "invalid_request"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def http_error_body(status_code: int, detail: Any = None) -> dict[str, Any]:
    """OpenAI's error shape for a Starlette/FastAPI ``HTTPException`` (unknown route, wrong
    method, a body FastAPI could not decode, ...), which FastAPI would answer as ``{"detail"}``."""
    etype, code = _HTTP_ERRORS.get(
        status_code, ("invalid_request_error" if status_code < 500 else "internal_error", f"http_{status_code}")
    )
    if isinstance(detail, str) and detail:
        message = detail
    else:
        try:
            message = HTTPStatus(status_code).phrase
        except ValueError:
            message = f"HTTP {status_code}"
    if status_code == 400 and message == "There was an error parsing the body":
        message = "request body could not be decoded (it must be UTF-8 JSON of reasonable depth)"
    return {"error": {"message": message, "type": etype, "code": code}}


async def send_error(send, exc: ServeAppError, headers: dict[str, str] | None = None) -> None:
    """Answer an ASGI request with ``exc`` in OpenAI's shape (for middleware, before any route)."""
    body = json.dumps(error_body(exc), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hdrs = {**retry_after_header(exc), **(headers or {})}
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in hdrs.items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
