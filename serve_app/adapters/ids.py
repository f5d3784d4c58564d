"""Adapter IDs: validated strings, safe to use as folder names and metric tags.

An ID becomes a folder name in the store (``<root>/<id>``, ``<registry_dir>/<id>/v<n>``), so
names of the registry's own files are reserved: an adapter called ``manifest.json`` made its
version folder collide with the manifest (on a local store every registry read failed from
then on; on S3 deleting it deleted the manifest). Hidden names (a leading ``.``: the registry
folder, ``.lock``, temp files) are never IDs at all. This module is the one place both rules
live: the router calls it for requests, the admin API and the registry for registrations.
"""

from __future__ import annotations

import re

from serve_app.errors import InvalidRequestError

MAX_ADAPTER_ID_LEN = 128
# Letters, digits and . _ - @ : (":" and "@" allow "tenant:task" and "id@version").
# fullmatch, not "$": "$" also matches before a trailing newline ("tenant-1\n" must be refused).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-@:]*")
# File names the registry keeps beside the version folders (compared case-insensitively: a
# case-insensitive filesystem makes "Manifest.JSON" the same file).
RESERVED_IDS = frozenset({"manifest.json"})


def is_reserved_id(adapter_id: str) -> bool:
    return adapter_id.casefold() in RESERVED_IDS


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
    if is_reserved_id(adapter_id):
        raise InvalidRequestError(
            f"adapter ID {adapter_id!r} is reserved: it is the name of a file of the adapter registry "
            f"(reserved: {sorted(RESERVED_IDS)}); choose another ID",
            code="invalid_model",
        )
    return adapter_id


def is_valid_id(name: object) -> bool:
    """``validate_adapter_id`` without raising (for filtering store listings)."""
    try:
        validate_adapter_id(name)
    except InvalidRequestError:
        return False
    return True
