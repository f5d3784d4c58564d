"""Adapter IDs: validated strings, safe to use as folder names and metric tags."""

from __future__ import annotations

import re

from serve_app.errors import InvalidRequestError

MAX_ADAPTER_ID_LEN = 128
# Letters, digits and . _ - @ : (":" and "@" allow "tenant:task" and "id@version").
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-@:]*$")


def validate_adapter_id(adapter_id: object) -> str:
    """Return the ID if it is safe; raise InvalidRequestError naming what is wrong."""
    if not isinstance(adapter_id, str) or not adapter_id:
        raise InvalidRequestError("adapter ID must be a non-empty string", code="invalid_model")
    if len(adapter_id) > MAX_ADAPTER_ID_LEN:
        raise InvalidRequestError(
            f"adapter ID is {len(adapter_id)} characters, more than the limit {MAX_ADAPTER_ID_LEN}",
            code="invalid_model",
        )
    if ".." in adapter_id or not _ID_RE.match(adapter_id):
        raise InvalidRequestError(
            f"adapter ID {adapter_id!r} is invalid: use letters, digits and . _ - @ : only "
            "(no '/', '..', whitespace), starting with a letter or digit",
            code="invalid_model",
        )
    return adapter_id
