"""Adapter versions: a manifest in the store maps each adapter ID to its current version.

Layout under the store root (``registry_dir``, default ``.registry``)::

    .registry/manifest.json          {"generation", "adapters": {id: {"current", "next", "versions", ...}}}
    .registry/<id>/v1/               an immutable copy of what was registered
    .registry/<id>/v2/
    <id>/                            "version 0": an adapter copied into the store by hand

A version is a folder that never changes once committed, so ``<id>@v<n>`` names its content
forever. The router resolves a tenant to ``<id>@v<n>`` (``<id>`` alone for version 0) and uses
that as the multiplexed model ID: an update is a new multiplexed model, requests already
running keep the ResidentAdapter they pinned, and replicas retire the old version.

Router replicas and LoRA replicas share the registry through the store (not process memory):
each re-reads the manifest every ``registry_refresh_s``.

Writes (register, delete) hold a lock where the backend has one (local: flock) and check the
manifest's generation before writing; on an object store two router replicas updating the
*same* instant can still race -- one of them then gets a 409 and retries.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.adapters.config import StoreConfig
from serve_app.adapters.ids import validate_adapter_id
from serve_app.adapters.store import (
    ADAPTER_FILES,
    AdapterStore,
    check_adapter_files,
    fingerprint,
    open_store,
)
from serve_app.errors import AdapterNotFoundError, InvalidAdapterError, InvalidRequestError, ServeAppError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_MUX_RE = re.compile(r"(?P<id>.+)@v(?P<v>[0-9]{1,9})")


class RegistryConflictError(ServeAppError):
    """Another writer changed the manifest while this update was in progress."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "adapter_update_conflict"


def mux_id(adapter_id: str, version: int) -> str:
    """The multiplexed model ID of one version: ``id`` for version 0, else ``id@v<n>``."""
    return adapter_id if version == 0 else f"{adapter_id}@v{version}"


def parse_mux_id(mux: str) -> tuple[str, int]:
    m = _MUX_RE.fullmatch(mux)
    return (m["id"], int(m["v"])) if m else (mux, 0)


def is_versioned_name(name: str) -> bool:
    return _MUX_RE.fullmatch(name) is not None


@dataclass
class Manifest:
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    generation: int = 0

    @classmethod
    def from_json(cls, data: bytes | None) -> "Manifest":
        if not data:
            return cls()
        raw = json.loads(data)
        return cls(adapters=dict(raw.get("adapters") or {}), generation=int(raw.get("generation", 0)))

    def to_json(self) -> bytes:
        return json.dumps(
            {"format": 1, "generation": self.generation, "updated_at": time.time(), "adapters": self.adapters},
            indent=1, sort_keys=True,
        ).encode()

    def entry(self, adapter_id: str) -> dict[str, Any] | None:
        return self.adapters.get(adapter_id)

    def next_version(self, adapter_id: str) -> int:
        e = self.entry(adapter_id)
        return int(e["next"]) if e else 1

    def current(self, adapter_id: str) -> int | None:
        """The version new requests get: 0 (the folder put in the store by hand, if there is one)
        when nothing was registered, None when deleted."""
        e = self.entry(adapter_id)
        if e is None:
            return 0
        return e.get("current")

    def is_deleted(self, adapter_id: str) -> bool:
        e = self.entry(adapter_id)
        return e is not None and e.get("current") is None

    def registered_ids(self) -> list[str]:
        """IDs whose current version is a registered one (v >= 1)."""
        return sorted(i for i, e in self.adapters.items() if (e.get("current") or 0) > 0)

    def deleted_ids(self) -> list[str]:
        return sorted(i for i, e in self.adapters.items() if e.get("current") is None)

    def is_stale(self, mux: str) -> bool:
        """Whether a loaded ``mux`` is an old or deleted version by this manifest.

        A version this manifest does not know yet (newer than its ``next``) is not stale: the
        reader's copy of the manifest is older than the router that sent it.
        """
        adapter_id, v = parse_mux_id(mux)
        e = self.entry(adapter_id)
        if e is None or v >= int(e.get("next", 1)):
            return False
        return e.get("current") != v


def _new_entry() -> dict[str, Any]:
    # current 0: the store's own folder (if any) until a version is committed.
    return {"current": 0, "next": 1, "versions": {}}


class AdapterRegistry:
    def __init__(self, store: AdapterStore, config: StoreConfig | None = None):
        self.store = store
        self.config = config or StoreConfig()
        self.dir = self.config.registry_dir.strip("/")

    # ---- layout --------------------------------------------------------------------------

    def version_rel(self, adapter_id: str, version: int) -> str:
        return adapter_id if version == 0 else f"{self.dir}/{adapter_id}/v{version}"

    def version_uri(self, adapter_id: str, version: int) -> str:
        return f"{self.store.uri.rstrip('/')}/{self.version_rel(adapter_id, version)}"

    # ---- reading -------------------------------------------------------------------------

    def read(self) -> Manifest:
        """The manifest as stored now (raises AdapterStoreUnavailableError)."""
        data = self.store.read_bytes(f"{self.dir}/{MANIFEST}")
        try:
            return Manifest.from_json(data)
        except (ValueError, TypeError) as e:
            raise ServeAppError(f"adapter registry manifest {self.dir}/{MANIFEST} is corrupt ({e})") from None

    def _write(self, manifest: Manifest, expected_generation: int) -> Manifest:
        now = self.read()
        if now.generation != expected_generation:
            raise RegistryConflictError(
                f"the adapter registry changed during this update (generation {expected_generation} -> "
                f"{now.generation}); retry the request"
            )
        manifest.generation = expected_generation + 1
        self.store.write_bytes(f"{self.dir}/{MANIFEST}", manifest.to_json())
        return manifest

    def lock(self):
        return self.store.lock(f"{self.dir}/.lock")

    # ---- writing -------------------------------------------------------------------------

    def stage(self, adapter_id: str, version: int, source_uri: str, *, progress=None) -> dict[str, Any]:
        """Copy the adapter at ``source_uri`` into version folder ``v<version>`` (not yet current).

        Only adapter_config.json and adapter_model.safetensors are copied, after the cheap checks
        (present, not a pickle, under the size cap); the full validation is a LoRA replica's
        parse, which the router runs before ``commit``.
        """
        validate_adapter_id(adapter_id)
        if is_versioned_name(adapter_id):
            raise InvalidRequestError(
                f"adapter ID {adapter_id!r} ends in '@v<number>', which is reserved for versions; choose another ID",
                code="invalid_model",
            )
        allowed = self.config.allowed_source_prefixes
        if allowed and not any(source_uri.startswith(p) for p in allowed):
            raise InvalidRequestError(
                f"uri {source_uri!r} is outside store.allowed_source_prefixes {allowed}; upload the adapter "
                "under one of those"
            )
        if ".." in source_uri.replace("\\", "/").split("/"):
            raise InvalidRequestError(f"uri {source_uri!r} must not contain '..' path segments")
        try:
            src = open_store(source_uri, self.config)
        except ValueError as e:
            raise InvalidRequestError(f"uri {source_uri!r} cannot be opened: {e}") from None
        files = {} if src.is_local and not Path(src.uri).is_dir() else src.list_files("")
        try:
            check_adapter_files(adapter_id, files, source_uri, max_bytes=self.config.max_adapter_bytes)
        except AdapterNotFoundError:
            raise InvalidAdapterError(
                f"adapter '{adapter_id}': nothing at {source_uri}; the URI must be a folder holding "
                "adapter_config.json and adapter_model.safetensors"
            ) from None
        rel = self.version_rel(adapter_id, version)
        self.store.delete_tree(rel)  # leftovers of an attempt that failed half-way
        with tempfile.TemporaryDirectory(prefix="serve_app_stage_") as tmp:
            for name in ADAPTER_FILES:
                local = str(Path(tmp) / name)
                src.get_file(name, local, callback=progress(name, files[name].size) if progress else None)
                got = Path(local).stat().st_size
                if got != files[name].size:
                    raise InvalidAdapterError(
                        f"adapter '{adapter_id}': {name} at {source_uri} changed while it was copied "
                        f"({files[name].size} -> {got} bytes); upload it again"
                    )
            try:
                json.loads((Path(tmp) / ADAPTER_FILES[0]).read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise InvalidAdapterError(f"adapter '{adapter_id}': {ADAPTER_FILES[0]} is not valid JSON ({e})") from None
            for name in (ADAPTER_FILES[1], ADAPTER_FILES[0]):  # config last: a folder with it is complete
                self.store.put_file(str(Path(tmp) / name), f"{rel}/{name}")
        return {
            "source": source_uri,
            "created_at": time.time(),
            "bytes": sum(files[n].size for n in ADAPTER_FILES),
            "fingerprint": fingerprint(files),
        }

    def discard(self, adapter_id: str, version: int) -> None:
        self.store.delete_tree(self.version_rel(adapter_id, version))

    def commit(self, adapter_id: str, version: int, info: dict[str, Any]) -> Manifest:
        """Make a staged version current; delete version folders beyond ``keep_versions``.

        Applied to the manifest as it is now (other tenants' concurrent changes are kept); a
        conflict is only another update of this tenant since ``version`` was chosen.
        """
        manifest = self.read()
        gen = manifest.generation
        e = manifest.adapters.setdefault(adapter_id, _new_entry())
        if int(e["next"]) != version:
            raise RegistryConflictError(
                f"version v{version} of '{adapter_id}' was taken by a concurrent update; retry the request"
            )
        e["versions"][str(version)] = {**info, "files": True}
        e["current"] = version
        e["next"] = version + 1
        e.pop("deleted_at", None)
        manifest = self._write(manifest, gen)
        keep = sorted((int(v) for v, i in e["versions"].items() if i.get("files")), reverse=True)
        pruned = keep[self.config.keep_versions:]
        for v in pruned:
            try:
                self.store.delete_tree(self.version_rel(adapter_id, v))
            except ServeAppError as err:  # a leftover folder is harmless; the manifest is what counts
                logger.warning("could not delete %s v%d: %s", adapter_id, v, err)
                continue
            e["versions"][str(v)]["files"] = False
        if pruned:
            manifest = self._write(manifest, manifest.generation)
        return manifest

    def record_failure(self, adapter_id: str, version: int, info: dict[str, Any], reason: str) -> Manifest:
        """Burn a version number whose files were refused, so ``id@v<n>`` always names one content
        (replicas remember refused versions). The current version is unchanged."""
        manifest = self.read()
        gen = manifest.generation
        e = manifest.adapters.setdefault(adapter_id, _new_entry())
        if int(e["next"]) != version:
            return manifest
        e["next"] = version + 1
        e["versions"][str(version)] = {**info, "files": False, "refused": reason[:1000]}
        return self._write(manifest, gen)

    def delete(self, adapter_id: str, *, in_store: bool) -> tuple[Manifest, int | None]:
        """Tombstone an adapter (new requests get 404) and delete its version folders.

        A version-0 folder placed in the store by hand is left in place, hidden by the tombstone.
        Returns the new manifest and the version that was current.
        """
        manifest = self.read()
        gen = manifest.generation
        e = manifest.entry(adapter_id)
        current = 0 if e is None else e.get("current")
        if current is None or (current == 0 and not in_store):
            raise AdapterNotFoundError(f"adapter '{adapter_id}' does not exist (or is already deleted)")
        e = manifest.adapters.setdefault(adapter_id, _new_entry())
        e["current"] = None
        e["deleted_at"] = time.time()
        manifest = self._write(manifest, gen)
        for v, info in e["versions"].items():
            if info.get("files"):
                try:
                    self.store.delete_tree(self.version_rel(adapter_id, int(v)))
                    info["files"] = False
                except ServeAppError as err:
                    logger.warning("could not delete %s v%s: %s", adapter_id, v, err)
        manifest = self._write(manifest, manifest.generation)
        with_files = f"{self.dir}/{adapter_id}"
        try:
            self.store.delete_tree(with_files)
        except ServeAppError:
            pass
        return manifest, current

