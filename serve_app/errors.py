"""Narrow exceptions, each with its HTTP status and OpenAI error type, and ``unwrap``.

Whatever layer raises one (engine, adapters, router), the router answers it as
``{"error": {"message", "type", "code"}}`` with its ``status_code`` (the shape is api/errors.py's);
anything else that escapes is a bug and becomes a 500. ``unwrap`` takes the client-facing
exception out of Ray's wrappers (every router module that awaits a replica uses it).

The errors many modules raise are here. One that a single module raises is declared beside it,
as a ServeAppError subclass, so it is shaped the same way: the engine's ``EngineError``,
``NonFiniteOutputError``, ``SamplingError``, ``GrammarError``, ``GrammarUnavailableError`` and
``AdapterNotResidentError``; the adapters' ``RegistryConflictError``, ``WriteConflictError`` and
``MissingAdapterFileError``; the router's ``RequestTooLargeError`` (router/middleware.py) and
``StreamLostError`` (router/streams.py).

A leaf: it imports nothing of serve_app (Ray only inside ``unwrap``).
"""

from __future__ import annotations


class ServeAppError(Exception):
    """Base class: a client-visible error with an HTTP status and OpenAI error type."""

    status_code: int = 500
    error_type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    # Exceptions cross Ray's process boundary by pickling; keep the keyword-only code.
    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.code))


def _rebuild(cls, message, code):
    return cls(message, code=code)


class InvalidRequestError(ServeAppError):
    """The request body is well-formed JSON but asks for something invalid."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationError(ServeAppError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ServeAppError):
    status_code = 403
    error_type = "permission_error"
    code = "model_not_permitted"


class AdapterNotFoundError(ServeAppError):
    """The requested model / adapter ID is unknown to the store."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class InvalidAdapterError(ServeAppError):
    """The adapter exists but cannot be served on this base (bad files, shapes, rank...)."""

    status_code = 422
    error_type = "invalid_request_error"
    code = "invalid_adapter"


class RateLimitError(ServeAppError):
    """Over a tenant's rate or concurrency limit. ``retry_after``: seconds until a retry can
    succeed (the router sends it as the ``Retry-After`` header, rounded up)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def __reduce__(self):
        return (_rebuild_rate_limit, (type(self), self.message, self.code, self.retry_after))


def _rebuild_rate_limit(cls, message, code, retry_after):
    return cls(message, code=code, retry_after=retry_after)


class AdapterStoreUnavailableError(ServeAppError):
    """The adapter store (disk, S3) cannot be reached right now; retry later."""

    status_code = 503
    error_type = "service_unavailable"
    code = "adapter_store_unavailable"


class EngineOverloadedError(ServeAppError):
    """No room for the request: adapter memory pinned by running requests, or queue full."""

    status_code = 503
    error_type = "service_unavailable"
    code = "engine_overloaded"


def unwrap(exc: BaseException) -> BaseException:
    """The client-facing exception inside Ray's wrappers (RayTaskError keeps it as .cause)."""
    from ray import exceptions as rex

    seen = 0
    while isinstance(exc, rex.RayTaskError) and getattr(exc, "cause", None) is not None and seen < 8:
        exc, seen = exc.cause, seen + 1
    if isinstance(exc, ServeAppError):
        return exc
    if isinstance(exc, (rex.ActorDiedError, rex.ActorUnavailableError)) or type(exc).__name__ == "BackPressureError":
        return EngineOverloadedError(f"a LoRA replica is unavailable ({type(exc).__name__}); retry shortly")
    return exc
