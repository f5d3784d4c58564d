"""The router's HTTP edge: the ASGI layers around every route, and its error answers.

From the outside in (``install`` wires them; Starlette runs the last one added first):

1. ``RouterReplicaHeader``: every answer names the router replica that gave it (``x-router-replica``),
   the 401s and 413s of the layers below included.
2. ``AuthMiddleware``: the caller's API key, before the body is read (401; 403 for /admin without an
   admin key). The caller goes into the scope for the route (``auth.principal_of``).
3. ``BodySizeLimitMiddleware``: 413 for a body over ``limits.max_body_bytes``, before any route
   parses it.

Then the routes. What they raise, and what FastAPI refuses before them (a body that does not
validate, an unknown route), is answered in OpenAI's error shape (api/errors.py) by the handlers
here and by ``error_response``, which the routes call themselves; every answer says which path
served it (``x-served-by``).

The layers are installed at import time, before any Router exists, so they read their settings
through ``install``'s ``edge`` dict, which the Router fills in its constructor (one Router per
replica process); until then ``AuthMiddleware`` answers 503: a half-started router never serves
unauthenticated.
"""

from __future__ import annotations

import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.api.errors import error_body, error_status, http_error_body, retry_after_header, send_error, validation_error_body
from serve_app.errors import EngineOverloadedError, InvalidRequestError, ServeAppError, unwrap
from serve_app.router.auth import Authenticator, attach_principal
from serve_app.router.config import DEFAULT_MAX_BODY_BYTES

logger = logging.getLogger("ray.serve")

SERVED_BY = "x-served-by"  # the serving path ("lora" | "merged") of every answer
ROUTER_REPLICA = "x-router-replica"
# Routes anyone may call: liveness and the API's own description.
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ADMIN_PREFIX = "/admin"


def install(app: FastAPI) -> dict:
    """Put the edge layers and the error handlers on ``app``; returns the settings they read:
    ``{"auth": Authenticator | None, "max_body_bytes": int | None}``, for the Router to fill."""
    edge: dict = {"auth": None, "max_body_bytes": None}
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=lambda: edge["max_body_bytes"])
    app.add_middleware(AuthMiddleware, authenticator=lambda: edge["auth"])
    app.add_middleware(RouterReplicaHeader)  # outermost: also on 401 / 413 answers
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _any_error)
    return edge


# --------------------------------------------------------------------------- error answers


def error_response(exc: BaseException, path: str = "lora", *, redact: bool = True) -> JSONResponse:
    """The OpenAI-shaped error answer. ``redact`` (every route but /admin): store URIs and local
    paths are taken out of the message (they stay in the server log), as tenants get it."""
    exc = unwrap(exc)
    status = error_status(exc)
    body = error_body(exc, redact=redact)
    if status >= 500:
        logger.error("request failed: %r", exc, exc_info=exc)
    elif redact and isinstance(exc, ServeAppError) and body["error"]["message"] != exc.message:
        logger.info("request refused (%d): %s", status, exc.message)
    return JSONResponse(body, status_code=status, headers={SERVED_BY: path, **retry_after_header(exc)})


async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse(validation_error_body(exc), status_code=400)


async def _http_error(request: Request, exc: StarletteHTTPException):
    """Unknown route (404), wrong method (405), undecodable body (400): OpenAI's shape, not {"detail"}."""
    return JSONResponse(
        http_error_body(exc.status_code, exc.detail), status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


async def _any_error(request: Request, exc: Exception):
    return error_response(exc)


# --------------------------------------------------------------------------- ASGI layers


class RouterReplicaHeader:
    """Pure ASGI: every response names the router replica that answered it (``x-router-replica``,
    Serve's replica ID), so operators and tests can tell replicas apart. Computed once per process."""

    _value: bytes | None = None

    def __init__(self, app):
        self.app = app

    @classmethod
    def value(cls) -> bytes:
        if cls._value is None:
            try:
                rid = serve.get_replica_context().replica_id
                cls._value = str(getattr(rid, "unique_id", rid)).encode("latin-1", "replace")
            except Exception:  # outside a replica (unit tests): no ID to give
                cls._value = b"unknown"
        return cls._value

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", ()), (ROUTER_REPLICA.encode(), self.value())]}
            await send(msg)

        return await self.app(scope, receive, send_with_header)


def relative_path(scope: dict) -> str:
    """The route path inside the app, without the application's route prefix (root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


class AuthMiddleware:
    """Pure ASGI: authenticate every HTTP request before its body is read.

    Public paths pass; ``/admin`` and below need an admin key; everything else needs a valid
    key. The caller is stored in the scope for the route (``principal_of(request)``), which
    then authorizes the model it asks for. ``authenticator`` is a zero-argument callable (the
    router sets it up in its constructor, after this middleware is installed); while it returns
    None the middleware answers 503, so a half-started router never serves unauthenticated.
    """

    def __init__(self, app, authenticator: Callable[[], Authenticator | None]):
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = relative_path(scope)
        if path in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        auth = self.authenticator()
        if auth is None:
            return await send_error(send, EngineOverloadedError("the router is starting; retry shortly"))
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        is_admin = path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")
        try:
            principal = auth.authenticate(header)
            if is_admin:
                auth.authorize(principal, None, admin=True)
        except ServeAppError as e:
            extra = {"www-authenticate": "Bearer"} if e.status_code == 401 else None
            return await send_error(send, e, extra)
        attach_principal(scope, principal)
        return await self.app(scope, receive, send)


class RequestTooLargeError(InvalidRequestError):
    """The request body is larger than the router accepts."""

    status_code = 413
    code = "request_too_large"


class BodySizeLimitMiddleware:
    """Pure ASGI: refuse bodies over the limit with 413 before any route parses them.

    A ``Content-Length`` over the limit is refused without reading; otherwise the body is read
    (at most limit + one chunk is held) and replayed to the app. ``max_bytes`` is an int or a
    zero-argument callable (the router sets the limit in its constructor); None means the
    default ``DEFAULT_MAX_BODY_BYTES``.
    """

    def __init__(self, app, max_bytes: int | Callable[[], int | None] = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    def _limit(self) -> int:
        v = self.max_bytes() if callable(self.max_bytes) else self.max_bytes
        return DEFAULT_MAX_BODY_BYTES if v is None else v

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit()
        too_large = RequestTooLargeError(f"request body is larger than this server's limit of {limit} bytes")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await send_error(send, InvalidRequestError("Content-Length is not an integer"))
                if declared > limit:
                    return await send_error(send, too_large, {"connection": "close"})
                break
        chunks: list[bytes] = []
        size = 0
        disconnected = False
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                disconnected = True
                break
            if msg["type"] != "http.request":
                continue
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                return await send_error(send, too_large, {"connection": "close"})
            if body:
                chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                if disconnected:
                    return {"type": "http.disconnect"}
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
