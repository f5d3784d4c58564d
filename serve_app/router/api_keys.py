"""The API key list: its entries, where it is read from, the stored form of a key, and a CLI.

* Keys are loaded from a file and/or an environment variable (a Kubernetes secret), as JSON or
  YAML, and only their SHA-256 digests are kept: a plaintext ``key`` in the file is hashed at load
  and dropped (router/auth.py checks presented keys against the digests).
* Each key maps to a tenant name, the adapter IDs it may use (exact IDs, ``prefix*`` or ``*``),
  whether it may use the base model, whether it is an admin key, and the prefix-cache group it
  shares cached prompt prefixes in (none: only with its own tenant's requests; see
  ``TenantPrincipal.cache_salt`` in auth.py).
* ``keys_file`` is re-read without a restart when it changes (``KeySources``: mtime, size, inode,
  so a Kubernetes secret volume's symlink swap counts).
* Keys never reach a log line or an error message: messages name the source and the entry's
  index, never the key or the file's content.

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

``python -m serve_app.router.api_keys new --tenant acme --adapters 'acme-*'`` prints a fresh
random key (once) and its entry; ``python -m serve_app.router.api_keys hash`` reads a key on
stdin and prints its digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from serve_app.router.config import AuthConfig

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MIN_KEY_LEN = 20


class KeyEntry(BaseModel):
    """One API key in the key list."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=128, description="Tenant name (rate limits are per tenant).")
    key_sha256: str | None = Field(
        default=None, description="Lower-case hex SHA-256 of the key (python -m serve_app.router.api_keys hash)."
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
    prefix_cache_group: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Keys with the same group share prefix-cache entries: a prompt prefix one of them sent "
        "is served from the cache for the others (faster, but the timing tells them that prefix was sent). "
        "Default (none): the key's cached prefixes are shared only with requests of its own tenant.",
    )

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

    def digest(self) -> str:
        """This entry's stored form (``key_sha256``, or the hash of its plaintext ``key``)."""
        return self.key_sha256 if self.key_sha256 is not None else hash_key(self.key.get_secret_value())


def hash_key(key: str) -> str:
    """The stored form of a key: lower-case hex SHA-256 of its UTF-8 bytes.

    API keys are long random strings, so a fast unsalted hash is enough (a slow password hash
    would cost every request); what matters is that the plaintext is not kept.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


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


# --------------------------------------------------------------------------- sources


class KeySources:
    """The key list's sources as ``auth`` names them (``keys_file``, ``keys_env``).

    ``read()`` reads every source now; ``read_if_changed()`` reads them again when ``keys_file``
    changed since (mtime, size, inode), checked at most every ``keys_reload_s``. ``environ`` is
    read once: a process's environment does not change.
    """

    def __init__(self, cfg: AuthConfig, environ: dict[str, str], clock: Callable[[], float]):
        self.cfg = cfg
        self._environ = environ
        self._clock = clock
        self._file_sig: tuple | None = None
        self._next_check = 0.0

    @property
    def watched(self) -> bool:
        """Whether ``keys_file`` is re-read when it changes (``keys_reload_s`` > 0)."""
        return bool(self.cfg.keys_file) and self.cfg.keys_reload_s > 0

    def read(self) -> list[KeyEntry]:
        """The entries of every source, now; KeyListError naming the source otherwise."""
        sig = _file_signature(self.cfg.keys_file) if self.cfg.keys_file else None
        entries = self._entries()
        self._file_sig, self._next_check = sig, self._clock() + self.cfg.keys_reload_s
        return entries

    def read_if_changed(self) -> list[KeyEntry] | None:
        """The entries again if ``keys_file`` changed since it was last read; None when it did
        not, or when it is not time to look. A file that changed into something unusable raises
        KeyListError once: the change is remembered, so it is not reported again every interval."""
        if not self.watched:
            return None
        now = self._clock()
        if now < self._next_check:
            return None
        self._next_check = now + self.cfg.keys_reload_s
        sig = _file_signature(self.cfg.keys_file)
        if sig == self._file_sig:
            return None
        self._file_sig = sig
        return self._entries()

    def _entries(self) -> list[KeyEntry]:
        cfg = self.cfg
        entries: list[KeyEntry] = []
        if cfg.keys_file:
            path = Path(cfg.keys_file)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise KeyListError(f"auth.keys_file {str(path)!r} cannot be read ({type(e).__name__})") from None
            entries += parse_key_list(text, f"auth.keys_file {str(path)!r}")
        if cfg.keys_env and self._environ.get(cfg.keys_env):
            entries += parse_key_list(self._environ[cfg.keys_env], f"environment variable {cfg.keys_env}")
        return entries


def _file_signature(path: str) -> tuple | None:
    """What changes when a key file is rewritten or its symlink swapped; None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


# --------------------------------------------------------------------------- CLI


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m serve_app.router.api_keys", description="API key helpers.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("hash", help="read a key on stdin, print its key_sha256")
    new = sub.add_parser("new", help="make a random key; print it once, and its key-list entry")
    new.add_argument("--tenant", required=True)
    new.add_argument("--adapters", nargs="*", default=[])
    new.add_argument("--admin", action="store_true")
    new.add_argument("--prefix-cache-group", default=None, help="share cached prompt prefixes with this group's keys")
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
    if args.prefix_cache_group:
        entry["prefix_cache_group"] = args.prefix_cache_group
    print(f"# give this key to {args.tenant}; it is not stored anywhere:\n# {key}", file=sys.stderr)
    print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
