"""HTTP error answers in OpenAI's shape, for the router's middleware and exception handlers.

``error_body`` (api/protocol.py) shapes a ServeAppError; here: the body of a Starlette/FastAPI
``HTTPException``, the ``Retry-After`` header of an error that carries one, and ``send_error``
for pure-ASGI middleware (auth, body size) that answers before any route.
"""

from __future__ import annotations

import json
import math
from http import HTTPStatus
from typing import Any

from serve_app.api.protocol import error_body
from serve_app.errors import ServeAppError


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
