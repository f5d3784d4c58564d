"""Adapter IDs: validated strings, safe to use as folder names and metric tags."""

from __future__ import annotations

import re

from serve_app.errors import InvalidRequestError

MAX_ADAPTER_ID_LEN = 128
# Letters, digits and . _ - @ : (":" and "@" allow "tenant:task" and "id@version").
# fullmatch, not "$": "$" also matches before a trailing newline ("tenant-1\n" must be refused).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-@:]*")


def validate_adapter_id(adapter_id: object) -> str:
    """Return the ID if it is safe; raise InvalidRequestError naming what is wrong."""
    if not isinstance(adapter_id, str) or not adapter_id:
        raise InvalidRequestError(
            f"adapter ID {adapter_id!r} is invalid: it must be a non-empty string (the adapter's name)",
            code="invalid_model",
        )
    if len(adapter_id) > MAX_ADAPTER_ID_LEN:
        raise InvalidRequestError(
            f"adapter ID {adapter_id[:32]!r}... is {len(adapter_id)} characters, more than the limit "
            f"{MAX_ADAPTER_ID_LEN}; use a shorter ID",
            code="invalid_model",
        )
    if ".." in adapter_id or not _ID_RE.fullmatch(adapter_id):
        raise InvalidRequestError(
            f"adapter ID {adapter_id!r} is invalid: use letters, digits and . _ - @ : only "
            "(no '/', '..', whitespace), starting with a letter or digit",
            code="invalid_model",
        )
    return adapter_id
