"""Who is calling, and which adapters that caller may use: authentication and authorization.

* Keys are Bearer tokens (``Authorization: Bearer <key>``, what the official OpenAI client
  sends), checked against the key list (router/api_keys.py: its entries, sources and reloads,
  where only SHA-256 digests are kept). A presented key is hashed and compared with **every**
  stored digest with ``hmac.compare_digest``, without stopping at a match, so the time taken says
  nothing about which key, or how much of one, matched.
* Missing / malformed / unknown key: 401. A key asking for an adapter outside its list: 403
  with one message that does not depend on whether that adapter exists (the check happens
  before the store is asked). ``/admin/*`` routes need an admin key (403 otherwise).
* ``auth.enabled: false`` (the local demo) lets every caller through as an anonymous admin and
  logs a warning at start; the cluster configs turn it on. Only the middleware grants that, and
  only when auth is explicitly off: a request that reaches a route with no principal on it
  (the middleware did not run) is a 401 from ``principal_of``, or, with auth off, the anonymous
  *non-admin* caller. Nothing defaults to admin.
* ``keys_file`` is re-read without a restart when it changes (polled every ``keys_reload_s``).
  A file that cannot be read or parsed, or holds no keys, keeps the last good keys and logs an
  error.
* Keys never reach a log line or an error message: messages name the tenant or the entry's
  index, never the key, the header or the file's content.

The ASGI layer that runs this before any body is read is ``AuthMiddleware`` (router/middleware.py).
HTTP only: Python handle callers (another Ray app in the same cluster) are trusted and do not
pass through this check.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from serve_app.errors import AuthenticationError, PermissionDeniedError
from serve_app.router.api_keys import KeyEntry, KeyListError, KeySources
from serve_app.router.config import AuthConfig

logger = logging.getLogger("ray.serve")

_SCOPE_KEY = "serve_app.principal"


# --------------------------------------------------------------------------- principals


@dataclass(frozen=True)
class TenantPrincipal:
    """Who a request comes from. ``tenant`` is None for the anonymous caller (auth off)."""

    tenant: str | None
    adapters: tuple[str, ...] = ()
    base_model: bool = True
    admin: bool = False
    prefix_cache_group: str | None = None  # its key's (api_keys.KeyEntry): whom it shares cached prefixes with

    def may_use(self, adapter_id: str | None) -> bool:
        """Whether this caller may use ``adapter_id`` (None: the base model)."""
        if self.tenant is None:
            return True
        if adapter_id is None:
            return self.base_model
        for p in self.adapters:
            if p == adapter_id or (p.endswith("*") and adapter_id.startswith(p[:-1])):
                return True
        return False

    @property
    def cache_salt(self) -> str | None:
        """The salt of this caller's prefix-cache entries (``GenerateRequest.cache_salt``): requests
        reuse each other's cached prompt prefixes only under one salt. Its key's
        ``prefix_cache_group`` (every key naming the group shares), else its own tenant (its keys
        share, as before); the two kinds are prefixed apart, so a tenant named like a group never
        shares with that group. None for the anonymous caller (auth off): the engine then salts
        by the request's tenant, the model name."""
        if self.tenant is None:
            return None
        if self.prefix_cache_group is not None:
            return f"group:{self.prefix_cache_group}"
        return f"tenant:{self.tenant}"

    def __repr__(self) -> str:  # never anything secret, but keep logs short
        return f"TenantPrincipal({self.tenant!r}, admin={self.admin})"


# The caller when auth is explicitly off (the local demo): every adapter and the admin routes.
# Only AuthMiddleware hands it out, and only from an Authenticator with enabled=False.
ANONYMOUS = TenantPrincipal(tenant=None, adapters=("*",), base_model=True, admin=True)
# What a route sees with auth off when the middleware left no principal: tenants' routes
# keep working, the admin routes do not.
ANONYMOUS_TENANT = TenantPrincipal(tenant=None, adapters=("*",), base_model=True, admin=False)


def _shown(value: object, limit: int = 64) -> str:
    """``value`` safe to echo in a message: repr (control characters and lone surrogates
    escaped, never raw), ASCII, cut to ``limit`` characters."""
    text = repr(value).encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class _StoredKey:
    digest: bytes  # 32 bytes
    principal: TenantPrincipal


class Authenticator:
    """Checks keys and permissions. Build with ``from_config``; all methods are cheap and sync."""

    def __init__(
        self, entries: Iterable[KeyEntry] = (), *, enabled: bool = True, clock: Callable[[], float] = time.monotonic
    ):
        self.enabled = enabled
        self._keys: tuple[_StoredKey, ...] = self._stored(entries, enabled)
        self._clock = clock
        self._sources: KeySources | None = None  # set by from_config when there is a keys_file to watch

    @staticmethod
    def _stored(entries: Iterable[KeyEntry], enabled: bool) -> tuple[_StoredKey, ...]:
        keys: list[_StoredKey] = []
        seen: set[str] = set()
        for i, e in enumerate(entries):
            digest = e.digest()
            if digest in seen:
                raise KeyListError(f"entry {i} (tenant {e.tenant!r}): the same key appears twice")
            seen.add(digest)
            principal = TenantPrincipal(tenant=e.tenant, adapters=tuple(e.adapters), base_model=e.base_model,
                                        admin=e.admin, prefix_cache_group=e.prefix_cache_group)
            keys.append(_StoredKey(bytes.fromhex(digest), principal))
        if enabled and not keys:
            raise KeyListError("auth is enabled but the key list is empty: no caller could get in")
        return tuple(keys)

    @classmethod
    def from_config(
        cls, cfg: AuthConfig, *, environ: dict[str, str] | None = None, clock: Callable[[], float] | None = None
    ) -> "Authenticator":
        """Load the keys named by ``cfg`` (in the router process: files and env vars are the node's)."""
        if not cfg.enabled:
            logger.warning(
                "API key auth is OFF (auth.enabled: false): any client can use any adapter and the admin "
                "routes. Fine for the local demo only; set auth.enabled: true with a key list elsewhere."
            )
            return cls(enabled=False)
        clock = time.monotonic if clock is None else clock
        sources = KeySources(cfg, dict(os.environ if environ is None else environ), clock)  # env read once: see keys_env
        auth = cls(sources.read(), enabled=True, clock=clock)
        if sources.watched:
            auth._sources = sources
        logger.info("API key auth is on: %s", auth._summary())
        return auth

    def _summary(self) -> str:
        keys = self._keys
        return (f"{len(keys)} keys for {len({k.principal.tenant for k in keys})} tenants "
                f"({sum(k.principal.admin for k in keys)} admin keys)")

    def maybe_reload(self) -> bool:
        """Re-read keys_file if it changed since it was last read (checked at most every
        ``keys_reload_s``). True if new keys are in use; a broken file keeps the old ones."""
        if self._sources is None:
            return False
        try:
            entries = self._sources.read_if_changed()
            if entries is None:
                return False
            keys = self._stored(entries, True)
        except KeyListError as e:
            logger.error("API keys NOT reloaded: %s; still using the last good keys (%s)", e, self._summary())
            return False
        self._keys = keys
        logger.warning("API keys reloaded from auth.keys_file: %s", self._summary())
        return True

    # ---- the checks ------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> TenantPrincipal:
        """The caller of an ``Authorization`` header value; 401 if missing, malformed or unknown."""
        if not self.enabled:
            return ANONYMOUS
        self.maybe_reload()
        if not authorization:
            raise AuthenticationError(
                "missing API key: send it as 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError(
                "malformed Authorization header: expected 'Bearer <key>'", code="invalid_api_key"
            )
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for k in self._keys:  # every key, no early exit: constant time in which one matched
            if hmac.compare_digest(k.digest, digest):
                found = k.principal
        if found is None:
            raise AuthenticationError("invalid API key", code="invalid_api_key")
        return found

    def authorize(self, principal: TenantPrincipal, adapter_id: str | None, *, admin: bool = False) -> None:
        """403 unless ``principal`` may use ``adapter_id`` (None: the base model) / the admin routes.

        Call it before looking the adapter up: the answer must not depend on whether it exists.
        """
        if admin and not principal.admin:
            raise PermissionDeniedError("this API key may not use the admin routes", code="admin_required")
        if admin:
            return
        if not principal.may_use(adapter_id):
            what = "the base model" if adapter_id is None else f"model {_shown(adapter_id)}"
            raise PermissionDeniedError(
                f"this API key is not permitted to use {what}; GET /v1/models lists the models it may use"
            )

    def check(self, authorization: str | None, adapter_id: str | None = None, *, admin: bool = False) -> TenantPrincipal:
        """``authenticate`` then ``authorize``: 401, 403, or the caller."""
        principal = self.authenticate(authorization)
        self.authorize(principal, adapter_id, admin=admin)
        return principal

    def tenant_count(self) -> int:
        return len({k.principal.tenant for k in self._keys})


# --------------------------------------------------------------------------- the caller of a request


def attach_principal(scope: dict, principal: TenantPrincipal) -> None:
    """Put the authenticated caller on an ASGI scope (AuthMiddleware), for ``principal_of``."""
    scope[_SCOPE_KEY] = principal


def principal_of(request_or_scope: Any, auth: Authenticator | None = None) -> TenantPrincipal:
    """The caller that ``AuthMiddleware`` put on this request.

    Fails closed when there is none (the middleware did not run on this route): 401, or, when
    ``auth`` is given and explicitly off, the anonymous caller WITHOUT admin rights. Never an
    admin by default.
    """
    scope = getattr(request_or_scope, "scope", request_or_scope)
    principal = scope.get(_SCOPE_KEY)
    if principal is not None:
        return principal
    if auth is not None and not auth.enabled:
        return ANONYMOUS_TENANT
    raise AuthenticationError(
        "this request carries no authenticated caller; send an API key as 'Authorization: Bearer <key>'",
        code="missing_api_key",
    )
