"""The adapter store interface: where a tenant's PEFT folder comes from.

One backend per file: ``local.py`` (a folder on this machine) and ``fsspec_store.py`` (any
fsspec URI: ``s3://`` through s3fs, ``gs://``, ``memory://`` ...); ``backends.py`` opens the
right one for a URI (``open_store``). This module imports neither. The engine only ever sees a
local folder; ``fetch.py`` makes one (a remote store goes through ``disk_cache.py``).

Paths given to a store are relative to its root, '/'-separated, and built only from validated
adapter IDs and fixed names (``<id>``, ``.registry/<id>/v3``), never from client text.

Errors: a missing folder is ``AdapterNotFoundError`` (404) or an empty listing; a store that
cannot be reached (connection refused, timeout, access denied, root folder gone) is
``AdapterStoreUnavailableError`` (503); a folder that exists but holds a broken adapter is
``InvalidAdapterError`` (422). These messages reach tenants: they name the adapter and the
problem, never the store's URI, a bucket, an endpoint or a local path (backends log those).

Conditional writes (``read_versioned`` + ``write_if``) are how the registry updates its manifest
without losing a concurrent writer's change: local stores compare under an flock, S3 uses a
conditional PUT (``If-Match`` on the ETag read, ``If-None-Match: *`` to create). A lost race is
``WriteConflictError`` (409), never a silent overwrite.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from serve_app.adapters.peft_files import (
    ADAPTER_FILES,
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    PICKLE_NAME,
    WEIGHTS_NAME,
    config_too_large,
    pickle_refused,
    weights_too_large,
)
from serve_app.errors import AdapterNotFoundError, InvalidAdapterError, ServeAppError


class WriteConflictError(ServeAppError):
    """A conditional write lost: the file changed (or was created) since it was read."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "adapter_update_conflict"


@dataclass(frozen=True)
class FileInfo:
    size: int
    tag: str  # changes when the content does: an ETag, or mtime_ns for a local file


class AdapterStore(Protocol):
    uri: str  # the root, as configured
    is_local: bool  # True: folders are read in place (no disk cache)
    tier: str  # metrics tag of loads from this store: "disk" (local) or "s3" / "remote"

    def list_ids(self) -> list[str]:
        """Adapter IDs with a folder at the root (hidden folders such as .registry excluded)."""

    def exists(self, adapter_id: str) -> bool:
        """Whether the root holds a folder for this adapter ID."""

    def list_files(self, rel: str) -> dict[str, FileInfo]:
        """Files directly in folder ``rel``; {} when the folder does not exist."""

    def local_dir(self, rel: str) -> str:
        """Local path of folder ``rel`` (local stores only)."""

    def read_bytes(self, rel: str) -> bytes | None:
        """A small file's content, None when it does not exist."""

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace a file atomically: readers see the old or the new content, never a mix."""

    def read_versioned(self, rel: str) -> tuple[bytes | None, str | None]:
        """A small file's content and its version tag (None, None when it does not exist)."""

    def write_if(self, rel: str, data: bytes, expected: str | None) -> str | None:
        """Replace the file only if its tag is still ``expected`` (None: only if it does not exist);
        return the new tag. Raises WriteConflictError when another writer came first."""

    def get_file(self, rel: str, local_path: str, callback=None) -> None:
        """Download one file; ``callback`` is an fsspec Callback (progress)."""

    def put_file(self, local_path: str, rel: str) -> None:
        """Upload one file."""

    def delete_tree(self, rel: str) -> None:
        """Delete a folder and everything in it (no error if it is gone)."""

    def lock(self, rel: str) -> AbstractContextManager:
        """An exclusive lock across processes where the backend has one (local: flock)."""


def check_adapter_files(adapter_id: str, files: dict[str, FileInfo], where: str, *, max_bytes: int) -> None:
    """Refuse a folder before downloading or copying anything: what is missing, what is too big.

    The same problems are caught again, by the same rules (peft_files.py), when the files are
    parsed (engine/lora/weights.py);
    this check exists so that a remote store never sends us a pickle or a 50 GB file.
    """
    if not files:
        raise AdapterNotFoundError(f"adapter '{adapter_id}' not found: no files in {where}")
    if CONFIG_NAME not in files:
        raise InvalidAdapterError(
            f"adapter '{adapter_id}': {CONFIG_NAME} is missing in {where}; save the adapter with PEFT's "
            "save_pretrained"
        )
    if WEIGHTS_NAME not in files:
        if PICKLE_NAME in files:
            raise pickle_refused(adapter_id)
        raise InvalidAdapterError(f"adapter '{adapter_id}': {WEIGHTS_NAME} is missing in {where}")
    size = files[WEIGHTS_NAME].size
    if size > max_bytes:
        raise weights_too_large(adapter_id, size, max_bytes)
    if files[CONFIG_NAME].size > MAX_CONFIG_BYTES:
        raise config_too_large(adapter_id, files[CONFIG_NAME].size)


def fingerprint(files: dict[str, FileInfo]) -> str:
    """Identity of a store folder's listing (sizes + ETags / mtimes): cheap, but backend-specific.
    Used to notice a hand-placed (version 0) folder replaced in place."""
    return ";".join(f"{n}:{files[n].size}:{files[n].tag}" for n in ADAPTER_FILES if n in files)


CONTENT_PREFIX = "sha256:"


def content_fingerprint(folder: str | Path) -> str:
    """Identity of an adapter's content: sha256 over both files' names and sha256 digests.

    The registry records it for every version it stages; every cache below (disk, the
    replicas' RAM tier) compares its copy with it, so a copy of other content is never served
    under a version's name. Missing files hash as empty (the parse refuses them anyway).
    """
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        d = hashlib.sha256()
        try:
            with open(Path(folder) / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    d.update(block)
        except FileNotFoundError:
            pass
        h.update(name.encode() + b"\0" + d.digest())
    return CONTENT_PREFIX + h.hexdigest()
