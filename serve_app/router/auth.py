"""Tenant API keys on the router: who is calling, and which adapters that caller may use.

* Keys are Bearer tokens (``Authorization: Bearer <key>``, what the official OpenAI client
  sends). They are loaded from a file and/or an environment variable (a Kubernetes secret), as
  JSON or YAML, and only their SHA-256 digests are kept: a plaintext ``key`` in the file is
  hashed at load and dropped. A presented key is hashed and compared with **every** stored
  digest with ``hmac.compare_digest``, without stopping at a match, so the time taken says
  nothing about which key, or how much of one, matched.
* Each key maps to a tenant name, the adapter IDs it may use (exact IDs, ``prefix*`` or
  ``*``), whether it may use the base model, and whether it is an admin key.
* Missing / malformed / unknown key: 401. A key asking for an adapter outside its list: 403
  with one message that does not depend on whether that adapter exists (the check happens
  before the store is asked). ``/admin/*`` routes need an admin key (403 otherwise).
* ``auth.enabled: false`` (the local demo) lets every caller through as an anonymous admin and
  logs a warning at start; the cluster configs turn it on. Only the middleware grants that, and
  only when auth is explicitly off: a request that reaches a route with no principal on it
  (the middleware did not run) is a 401 from ``principal_of``, or, with auth off, the anonymous
  *non-admin* caller. Nothing defaults to admin.
* ``keys_file`` is re-read without a restart when it changes (polled every ``keys_reload_s``:
  mtime, size, inode, so a Kubernetes secret volume's symlink swap counts). A file that cannot
  be read or parsed, or holds no keys, keeps the last good keys and logs an error.
* Keys never reach a log line or an error message: messages name the tenant or the entry's
  index, never the key, the header or the file's content.

Key file (``keys_file`` or the ``keys_env`` variable; a list or ``{"keys": [...]}``)::

    keys:
      - tenant: acme
        key_sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
        adapters: ["acme-*"]          # acme-support, acme-sales, ...
      - tenant: globex
        key: sk-globex-use-a-long-random-string   # hashed at load; prefer key_sha256
        adapters: ["globex-chat", "globex-sql"]
        base_model: false
      - tenant: ops
        key_sha256: ...
        admin: true

``python -m serve_app.router.auth new --tenant acme --adapters 'acme-*'`` prints a fresh random
key (once) and its entry; ``python -m serve_app.router.auth hash`` reads a key on stdin and
prints its digest.

HTTP only: Python handle callers (another Ray app in the same cluster) are trusted and do not
pass through this check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from serve_app.api.errors import send_error
from serve_app.errors import AuthenticationError, EngineOverloadedError, PermissionDeniedError, ServeAppError
from serve_app.router.config import AuthConfig

logger = logging.getLogger("ray.serve")

# Routes anyone may call: liveness and the API's own description.
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ADMIN_PREFIX = "/admin"
_SCOPE_KEY = "serve_app.principal"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MIN_KEY_LEN = 20


class KeyEntry(BaseModel):
    """One API key in the key list."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=128, description="Tenant name (rate limits are per tenant).")
    key_sha256: str | None = Field(
        default=None, description="Lower-case hex SHA-256 of the key (python -m serve_app.router.auth hash)."
    )
    key: SecretStr | None = Field(
        default=None,
        description=f"The key itself (at least {MIN_KEY_LEN} characters); hashed at load and then dropped.",
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="Adapter IDs this key may use: exact IDs, 'prefix*', or '*' for all.",
    )
    base_model: bool = Field(default=True, description="Whether this key may use the base model (no adapter).")
    admin: bool = Field(default=False, description="Whether this key may call the /admin routes.")

    @field_validator("adapters")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or "*" in p[:-1]:
                raise ValueError("adapter patterns are exact IDs, 'prefix*' or '*' ('*' only at the end)")
        return v

    @model_validator(mode="after")
    def _one_key(self) -> "KeyEntry":
        if (self.key_sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of key_sha256 and key")
        if self.key_sha256 is not None and not _HEX64.match(self.key_sha256):
            raise ValueError("key_sha256 must be 64 lower-case hex digits")
        if self.key is not None and len(self.key.get_secret_value()) < MIN_KEY_LEN:
            raise ValueError(f"key is shorter than {MIN_KEY_LEN} characters; use a long random key")
        return self


def hash_key(key: str) -> str:
    """The stored form of a key: lower-case hex SHA-256 of its UTF-8 bytes.

    API keys are long random strings, so a fast unsalted hash is enough (a slow password hash
    would cost every request); what matters is that the plaintext is not kept.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- principals


@dataclass(frozen=True)
class TenantPrincipal:
    """Who a request comes from. ``tenant`` is None for the anonymous caller (auth off)."""

    tenant: str | None
    adapters: tuple[str, ...] = ()
    base_model: bool = True
    admin: bool = False

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


class KeyListError(ValueError):
    """The key list cannot be used; the message never contains a key or the file's content."""


def parse_key_list(text: str, source: str) -> list[KeyEntry]:
    """Entries from a JSON or YAML key list. Errors name the source and the entry, never a value."""
    data: Any
    try:
        data = json.loads(text)
    except ValueError:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            raise KeyListError(f"{source}: not valid JSON or YAML") from None
    if isinstance(data, dict) and set(data) == {"keys"}:
        data = data["keys"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise KeyListError(f"{source}: expected a list of key entries (or {{keys: [...]}})")
    entries = []
    for i, item in enumerate(data):
        try:
            entries.append(KeyEntry.model_validate(item))
        except ValidationError as e:
            # include_input=False: the failing value may be the key itself.
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}"
                for err in e.errors(include_input=False, include_url=False)
            )
            raise KeyListError(f"{source}: entry {i}: {problems}") from None
    return entries


class Authenticator:
    """Checks keys and permissions. Build with ``from_config``; all methods are cheap and sync."""

    def __init__(
        self, entries: Iterable[KeyEntry] = (), *, enabled: bool = True, clock: Callable[[], float] = time.monotonic
    ):
        self.enabled = enabled
        self._keys: tuple[_StoredKey, ...] = self._stored(entries, enabled)
        self._clock = clock
        # Set by from_config when there is a keys_file to watch.
        self._cfg: AuthConfig | None = None
        self._environ: dict[str, str] | None = None
        self._file_sig: tuple | None = None
        self._next_check = 0.0

    @staticmethod
    def _stored(entries: Iterable[KeyEntry], enabled: bool) -> tuple[_StoredKey, ...]:
        keys: list[_StoredKey] = []
        seen: set[str] = set()
        for i, e in enumerate(entries):
            digest = e.key_sha256 if e.key_sha256 is not None else hash_key(e.key.get_secret_value())
            if digest in seen:
                raise KeyListError(f"entry {i} (tenant {e.tenant!r}): the same key appears twice")
            seen.add(digest)
            keys.append(
                _StoredKey(
                    bytes.fromhex(digest),
                    TenantPrincipal(tenant=e.tenant, adapters=tuple(e.adapters), base_model=e.base_model, admin=e.admin),
                )
            )
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
        env = dict(os.environ if environ is None else environ)  # read once: see keys_env
        sig = _file_signature(cfg.keys_file) if cfg.keys_file else None
        auth = cls(_load_entries(cfg, env), enabled=True, **({} if clock is None else {"clock": clock}))
        if cfg.keys_file and cfg.keys_reload_s > 0:
            auth._cfg, auth._environ, auth._file_sig = cfg, env, sig
            auth._next_check = auth._clock() + cfg.keys_reload_s
        logger.info("API key auth is on: %s", auth._summary())
        return auth

    def _summary(self) -> str:
        keys = self._keys
        return (f"{len(keys)} keys for {len({k.principal.tenant for k in keys})} tenants "
                f"({sum(k.principal.admin for k in keys)} admin keys)")

    def maybe_reload(self) -> bool:
        """Re-read keys_file if it changed since it was last read (checked at most every
        ``keys_reload_s``). True if new keys are in use; a broken file keeps the old ones."""
        cfg = self._cfg
        if cfg is None:
            return False
        now = self._clock()
        if now < self._next_check:
            return False
        self._next_check = now + cfg.keys_reload_s
        sig = _file_signature(cfg.keys_file)
        if sig == self._file_sig:
            return False
        self._file_sig = sig  # a broken version is reported once, not every interval
        try:
            keys = self._stored(_load_entries(cfg, self._environ or {}), True)
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


# --------------------------------------------------------------------------- ASGI middleware


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


def _file_signature(path: str) -> tuple | None:
    """What changes when a key file is rewritten or its symlink swapped; None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _load_entries(cfg: AuthConfig, env: dict[str, str]) -> list[KeyEntry]:
    """The key entries of every source ``cfg`` names; KeyListError naming the source otherwise."""
    entries: list[KeyEntry] = []
    if cfg.keys_file:
        path = Path(cfg.keys_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KeyListError(f"auth.keys_file {str(path)!r} cannot be read ({type(e).__name__})") from None
        entries += parse_key_list(text, f"auth.keys_file {str(path)!r}")
    if cfg.keys_env and env.get(cfg.keys_env):
        entries += parse_key_list(env[cfg.keys_env], f"environment variable {cfg.keys_env}")
    return entries


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
        scope[_SCOPE_KEY] = principal
        return await self.app(scope, receive, send)


# --------------------------------------------------------------------------- CLI


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m serve_app.router.auth", description="API key helpers.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("hash", help="read a key on stdin, print its key_sha256")
    new = sub.add_parser("new", help="make a random key; print it once, and its key-list entry")
    new.add_argument("--tenant", required=True)
    new.add_argument("--adapters", nargs="*", default=[])
    new.add_argument("--admin", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "hash":
        key = sys.stdin.readline().rstrip("\r\n")
        if len(key) < MIN_KEY_LEN:
            print(f"key is shorter than {MIN_KEY_LEN} characters", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    key = "sk-" + secrets.token_urlsafe(32)
    entry = {"tenant": args.tenant, "key_sha256": hash_key(key), "adapters": args.adapters, "admin": args.admin}
    print(f"# give this key to {args.tenant}; it is not stored anywhere:\n# {key}", file=sys.stderr)
    print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
