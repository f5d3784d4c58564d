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

Router replicas and engine replicas share the registry through the store (not process memory):
each re-reads the manifest every ``registry_refresh_s`` (``ManifestWatcher``, the one poller).

Integrity (why the writes look the way they do):

* A version number is never reused. ``reserve`` burns it in the manifest (``next`` bumped, the
  version recorded as ``state: staging``) *before* anything is copied; a registration that is
  interrupted (client gone, cancelled, router killed) leaves a burnt number, never a free one
  whose folder and replica caches hold unvalidated content. Its cleanup marks it
  ``abandoned`` (or ``refused`` with the reason) and deletes its files. Only a ``staging``
  version can be committed, and never over a newer current one.
* Every staged version records the content fingerprint of its files (store.content_fingerprint);
  the caches below (disk, the replicas' RAM and handoff tiers) compare their copy with it on a
  hit, so even a reused location is never answered from a stale copy.
* Every manifest write is conditional (``store.write_if``: an flock on a local store, a PUT
  with If-Match / If-None-Match on S3) on the version of the manifest the change was computed
  from. A lost race re-reads and re-applies the change (other tenants' concurrent changes are
  kept); a change that no longer applies (this tenant was changed meanwhile), or a race lost
  ``_WRITE_ATTEMPTS`` times in a row, is a 409 -- never a silent success.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from serve_app.adapters.backends import open_store
from serve_app.adapters.config import StoreConfig
from serve_app.adapters.ids import validate_adapter_id
from serve_app.adapters.store import (
    ADAPTER_FILES,
    CONTENT_PREFIX,
    AdapterStore,
    WriteConflictError,
    check_adapter_files,
    content_fingerprint,
)
from serve_app.errors import AdapterNotFoundError, InvalidAdapterError, InvalidRequestError, ServeAppError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_WRITE_ATTEMPTS = 8  # conditional writes lost in a row before a 409
STAGING_TTL_S = 6 * 3600.0  # a "staging" version older than this is a crashed registration's leftover
_DOWN_BACKOFF_S = 5.0
T = TypeVar("T")
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
    # The store's version tag of the manifest this was read from (S3 ETag, local sha256); None
    # when it did not exist. Writes are conditional on it.
    tag: str | None = field(default=None, compare=False)

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

    def version_info(self, adapter_id: str, version: int) -> dict[str, Any] | None:
        e = self.entry(adapter_id)
        return None if e is None else (e.get("versions") or {}).get(str(version))

    def fingerprint(self, adapter_id: str, version: int) -> str | None:
        """The content fingerprint recorded for a version (None: version 0, not staged yet, or a
        manifest written before content fingerprints)."""
        info = self.version_info(adapter_id, version) if version > 0 else None
        fp = (info or {}).get("fingerprint")
        return fp if isinstance(fp, str) and fp.startswith(CONTENT_PREFIX) else None

    def is_stale(self, mux: str) -> bool:
        """Whether a loaded ``mux`` is an old or deleted version by this manifest.

        A version this manifest does not know yet (newer than its ``next``) is not stale: the
        reader's copy of the manifest is older than the router that sent it. Neither is one
        being validated (``staging``): the router makes it current next.
        """
        adapter_id, v = parse_mux_id(mux)
        e = self.entry(adapter_id)
        if e is None or v >= int(e.get("next", 1)):
            return False
        if (self.version_info(adapter_id, v) or {}).get("state") == "staging":
            return False
        return e.get("current") != v


def _new_entry() -> dict[str, Any]:
    # current 0: the store's own folder (if any) until a version is committed.
    return {"current": 0, "next": 1, "versions": {}}


def _state(info: dict[str, Any]) -> str:
    """A version's state; manifests from before states: refused or committed."""
    return str(info.get("state") or ("refused" if info.get("refused") else "committed"))


class _Unchanged(Exception):
    """Raised by an _update change that has nothing to write; carries its result."""

    def __init__(self, value: Any = None):
        super().__init__()
        self.value = value


class AdapterRegistry:
    def __init__(self, store: AdapterStore, config: StoreConfig | None = None):
        self.store = store
        self.config = config or StoreConfig()
        self.dir = self.config.registry_dir.strip("/")
        self._cached: tuple[Manifest, float] | None = None  # the last manifest read or written here
        self._cache_lock = threading.Lock()
        self._last_warning = -1e9
        self._down_until = 0.0  # fingerprint_of does not ask the store again before this (monotonic)

    # ---- layout --------------------------------------------------------------------------

    @property
    def manifest_rel(self) -> str:
        return f"{self.dir}/{MANIFEST}"

    def version_rel(self, adapter_id: str, version: int) -> str:
        return adapter_id if version == 0 else f"{self.dir}/{adapter_id}/v{version}"

    def version_uri(self, adapter_id: str, version: int) -> str:
        """Where a version lives (for the server's logs only: never put it in a tenant's error)."""
        return f"{self.store.uri.rstrip('/')}/{self.version_rel(adapter_id, version)}"

    # ---- reading -------------------------------------------------------------------------

    def read(self) -> Manifest:
        """The manifest as stored now, with its version tag (raises AdapterStoreUnavailableError)."""
        data, tag = self.store.read_versioned(self.manifest_rel)
        try:
            manifest = Manifest.from_json(data)
        except (ValueError, TypeError, AttributeError) as e:
            logger.error("adapter registry manifest %s/%s is corrupt (%s)", self.store.uri, self.manifest_rel, e)
            raise ServeAppError(
                "the adapter registry's manifest is corrupt (the server log says where and why); restore it "
                "from a backup, or delete it to start the registry over"
            ) from None
        manifest.tag = tag
        self._remember(manifest)
        return manifest

    def _remember(self, manifest: Manifest) -> None:
        with self._cache_lock:
            if self._cached is None or manifest.generation >= self._cached[0].generation:
                self._cached = (manifest, time.monotonic())

    def fingerprint_of(self, adapter_id: str, version: int) -> str | None:
        """The content fingerprint the manifest records for ``adapter_id`` version ``version``.

        A recorded fingerprint never changes (a number is never reused), so one seen here
        before is answered without I/O; otherwise the manifest is read now -- not again for
        ``_DOWN_BACKOFF_S`` after the store failed to answer, so loads from the RAM tier do not
        each wait for a dead store. None for version 0, for a version not staged yet or from an
        old manifest, and when the store cannot say (callers then trust their copy).
        """
        if version <= 0:
            return None
        cached = self._cached
        fp = None if cached is None else cached[0].fingerprint(adapter_id, version)
        if fp is not None or time.monotonic() < self._down_until:
            return fp
        try:
            return self.read().fingerprint(adapter_id, version)
        except ServeAppError as e:
            self._down_until = time.monotonic() + _DOWN_BACKOFF_S
            if time.monotonic() - self._last_warning > 30:
                self._last_warning = time.monotonic()
                logger.warning("cannot read the adapter registry to check %s@v%d (%s); trusting cached copies",
                               adapter_id, version, e.message)
            return None

    # ---- conditional updates ---------------------------------------------------------------

    def _update(self, change: Callable[[Manifest], T]) -> tuple[Manifest, T]:
        """Apply ``change`` to the manifest as stored now and write it, conditional on nobody
        having written since it was read; on a lost race, re-read and apply again.

        ``change`` mutates the manifest it is given and returns a result; it raises to refuse
        (RegistryConflictError, AdapterNotFoundError ...) or ``_Unchanged`` when there is
        nothing to write.
        """
        for attempt in range(_WRITE_ATTEMPTS):
            manifest = self.read()
            read_tag = manifest.tag
            try:
                result = change(manifest)
            except _Unchanged as u:
                return manifest, u.value
            manifest.generation += 1
            data = manifest.to_json()
            try:
                manifest.tag = self.store.write_if(self.manifest_rel, data, read_tag)
            except WriteConflictError:
                # Lost -- unless what "lost" was our own write, retried after its answer was lost.
                try:
                    now, now_tag = self.store.read_versioned(self.manifest_rel)
                except ServeAppError:
                    now, now_tag = None, None
                if now == data:
                    manifest.tag = now_tag
                    self._remember(manifest)
                    return manifest, result
                logger.info("adapter registry: a concurrent write came first (attempt %d); applying again", attempt + 1)
                time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
                continue
            self._remember(manifest)
            return manifest, result
        raise RegistryConflictError(
            f"the adapter registry was changed by other writers {_WRITE_ATTEMPTS} times in a row during this "
            "update; retry the request"
        )

    def lock(self):
        """A cross-process lock where the backend has one (local: flock). Manifest writes do not
        need it (they are conditional); kept for callers that serialize longer sequences."""
        return self.store.lock(f"{self.dir}/.lock")

    # ---- writing -------------------------------------------------------------------------

    def precheck(self, adapter_id: str, source_uri: str) -> None:
        """The checks that need no I/O: the ID, and whether ``source_uri`` may be read at all."""
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

    def reserve(self, adapter_id: str, source_uri: str) -> tuple[int, Manifest]:
        """Burn the next version number for a registration (``state: staging``) and return it.

        From here on the number is never handed out again, whatever happens to the registration.
        """
        self.precheck(adapter_id, source_uri)

        def change(m: Manifest) -> int:
            e = m.adapters.setdefault(adapter_id, _new_entry())
            v = int(e["next"])
            e["next"] = v + 1
            e.setdefault("versions", {})[str(v)] = {
                "state": "staging", "source": source_uri, "created_at": time.time(), "files": True,
            }
            return v

        manifest, version = self._update(change)
        return version, manifest

    def stage(self, adapter_id: str, version: int, source_uri: str, *, progress=None) -> dict[str, Any]:
        """Copy the adapter at ``source_uri`` into version folder ``v<version>`` (not yet current).

        Only adapter_config.json and adapter_model.safetensors are copied, after the cheap checks
        (present, not a pickle, under the size cap); the full validation is a LoRA replica's
        parse, which the router runs before ``commit``. The returned info holds the content
        ``fingerprint`` of what was copied (store.content_fingerprint).
        """
        self.precheck(adapter_id, source_uri)
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
            content = content_fingerprint(tmp)
            for name in (ADAPTER_FILES[1], ADAPTER_FILES[0]):  # config last: a folder with it is complete
                self.store.put_file(str(Path(tmp) / name), f"{rel}/{name}")
        return {
            "source": source_uri,
            "created_at": time.time(),
            "bytes": sum(files[n].size for n in ADAPTER_FILES),
            "fingerprint": content,
        }

    def discard(self, adapter_id: str, version: int) -> None:
        self.store.delete_tree(self.version_rel(adapter_id, version))

    def commit(self, adapter_id: str, version: int, info: dict[str, Any]) -> Manifest:
        """Make a staged version current; delete version folders beyond ``keep_versions``.

        Applied to the manifest as it is now (other tenants' concurrent changes are kept). A
        409 when the version is no longer ``staging`` (abandoned, refused, its adapter deleted
        meanwhile) or a newer version of this adapter became current meanwhile. A version staged
        without ``reserve`` must still be ``next`` (it is burnt here).
        """

        def change(m: Manifest) -> None:
            e = m.adapters.setdefault(adapter_id, _new_entry())
            versions = e.setdefault("versions", {})
            prior = versions.get(str(version))
            if prior is None:
                if int(e["next"]) != version:
                    raise RegistryConflictError(
                        f"version v{version} of '{adapter_id}' was taken by a concurrent update; retry the request"
                    )
                e["next"] = version + 1
            elif _state(prior) != "staging":
                why = prior.get(_state(prior)) if isinstance(prior.get(_state(prior)), str) else ""
                raise RegistryConflictError(
                    f"version v{version} of '{adapter_id}' was {_state(prior)}{f' ({why[:200]})' if why else ''} "
                    "before it could be made current; register the adapter again"
                )
            elif not prior.get("files"):
                raise RegistryConflictError(
                    f"the files of version v{version} of '{adapter_id}' were deleted during its registration; "
                    "register the adapter again"
                )
            current = e.get("current")
            if current is not None and current > version:
                raise RegistryConflictError(
                    f"a newer version v{current} of '{adapter_id}' was made current while v{version} was being "
                    f"validated; register again if v{version}'s files should replace it"
                )
            versions[str(version)] = {**(prior or {}), **info, "state": "committed", "files": True,
                                      "committed_at": time.time()}
            e["current"] = version
            e.pop("deleted_at", None)

        manifest, _ = self._update(change)
        return self._prune(adapter_id, manifest)

    def _prune(self, adapter_id: str, manifest: Manifest) -> Manifest:
        """Delete folders nobody may read any more: committed versions beyond ``keep_versions``,
        leftovers of abandoned / refused attempts, and staging versions older than STAGING_TTL_S
        (a router that died mid-registration). The manifest says so first, then files go."""
        keep = self.config.keep_versions

        def doomed_in(e: dict[str, Any]) -> list[int]:
            versions = e.get("versions") or {}
            with_files = {int(v): i for v, i in versions.items() if i.get("files")}
            committed = sorted((v for v, i in with_files.items() if _state(i) == "committed"), reverse=True)
            out = [v for v in committed[keep:] if v != e.get("current")]
            now = time.time()
            for v, i in with_files.items():
                st = _state(i)
                if st in ("abandoned", "refused") or (
                        st == "staging" and now - float(i.get("created_at") or now) > STAGING_TTL_S):
                    out.append(v)
            return sorted(out)

        e = manifest.entry(adapter_id)
        if e is None or not doomed_in(e):
            return manifest

        def change(m: Manifest) -> list[int]:
            e = m.entry(adapter_id)
            doomed = doomed_in(e) if e is not None else []
            if not doomed:
                raise _Unchanged([])
            for v in doomed:
                i = e["versions"][str(v)]
                i["files"] = False
                if _state(i) == "staging":
                    i["state"], i["abandoned"] = "abandoned", "left behind by a registration that never finished"
            return doomed

        manifest, doomed = self._update(change)
        self._delete_folders(adapter_id, doomed)
        return manifest

    def _delete_folders(self, adapter_id: str, versions: list[int]) -> None:
        for v in versions:
            try:
                self.store.delete_tree(self.version_rel(adapter_id, v))
            except ServeAppError as err:  # a leftover folder is harmless; the manifest is what counts
                logger.warning("could not delete %s v%d: %s", adapter_id, v, err)

    def abandon(self, adapter_id: str, version: int, reason: str, *, refused: bool = False,
                info: dict[str, Any] | None = None) -> Manifest | None:
        """End a registration that will not be committed: mark its (burnt) number ``abandoned``
        or ``refused`` with ``reason``, then delete its files. A version that is no longer
        ``staging`` (committed meanwhile, already ended) is left alone: returns None."""
        state = "refused" if refused else "abandoned"

        def change(m: Manifest) -> bool:
            e = m.adapters.setdefault(adapter_id, _new_entry())
            versions = e.setdefault("versions", {})
            i = versions.get(str(version))
            if i is None:
                if int(e["next"]) != version:  # not ours to burn
                    raise _Unchanged(False)
                e["next"] = version + 1
                i = versions[str(version)] = {}
            elif _state(i) != "staging":
                raise _Unchanged(False)
            i.update({**(info or {}), "state": state, state: reason[:1000], "files": False, "ended_at": time.time()})
            return True

        manifest, changed = self._update(change)
        if not changed:
            return None
        self._delete_folders(adapter_id, [version])
        return manifest

    def record_failure(self, adapter_id: str, version: int, info: dict[str, Any], reason: str) -> Manifest:
        """Burn a version number whose files were refused, so ``id@v<n>`` always names one content
        (replicas remember refused versions). The current version is unchanged."""
        manifest = self.abandon(adapter_id, version, reason, refused=True, info=info)
        return manifest if manifest is not None else self.read()

    def delete(self, adapter_id: str, *, in_store: bool) -> tuple[Manifest, int | None]:
        """Tombstone an adapter (new requests get 404) and delete its version folders.

        A registration of it still in flight is abandoned (its commit is a 409). A version-0
        folder placed in the store by hand is left in place, hidden by the tombstone. Returns
        the new manifest and the version that was current.
        """

        def change(m: Manifest) -> tuple[int, list[int]]:
            e = m.entry(adapter_id)
            current = 0 if e is None else e.get("current")
            if current is None or (current == 0 and not in_store):
                raise AdapterNotFoundError(f"adapter '{adapter_id}' does not exist (or is already deleted)")
            e = m.adapters.setdefault(adapter_id, _new_entry())
            e["current"] = None
            e["deleted_at"] = time.time()
            doomed = []
            for v, i in (e.get("versions") or {}).items():
                if _state(i) == "staging":
                    i["state"], i["abandoned"] = "abandoned", "the adapter was deleted during this registration"
                if i.get("files"):
                    i["files"] = False
                    doomed.append(int(v))
            return current, doomed

        manifest, (current, doomed) = self._update(change)
        self._delete_folders(adapter_id, doomed)
        return manifest, current


class ManifestWatcher:
    """The one manifest poller: read the manifest every ``period_s`` and hand each read to
    ``on_manifest``.

    Every process that acts on versions runs one: a router replica keeps its resolve snapshot
    fresh (router/admin.py, on a daemon thread: ``start_thread``), and both engine deployments
    retire old and deleted versions (deployments/versioned.py, as a task on the replica's event
    loop: ``run``, reads in a worker thread). ``registry_refresh_s`` is therefore the propagation
    bound of an update or delete everywhere, and one place says how a poll fails:

    * the store does not answer: ``on_error`` (default: a warning at most once a minute, saying
      that what is loaded keeps serving) and the next poll is the retry; nothing is dropped;
    * ``on_manifest`` raises: logged, and the next poll hands over the manifest again;
    * ``writes``: for a process that also writes the manifest and takes each written manifest
      at once (the router's admin API): a counter it bumps on each write. A read during which it
      changed is dropped, since it may predate that write.

    ``on_manifest`` may be a coroutine function when run with ``run``/``poll_async``. ``also``
    runs after every poll, whether or not the read succeeded (the router's store listing).
    """

    def __init__(
        self,
        registry: AdapterRegistry,
        period_s: float,
        on_manifest: Callable[[Manifest], Any],
        *,
        on_error: Callable[[Exception], None] | None = None,
        writes: Callable[[], Any] | None = None,
        also: Callable[[], None] | None = None,
        serving: str = "loaded adapters keep serving",
        log: logging.Logger | None = None,
    ):
        self.registry = registry
        self.period_s = period_s
        self.on_manifest = on_manifest
        self.on_error = on_error or self._warn
        self.writes = writes or (lambda: None)
        self.also = also
        self.serving = serving
        self.log = log or logger
        self._warned_at = -1e9
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- one poll ----------------------------------------------------------------------------

    def _warn(self, e: Exception) -> None:
        if time.monotonic() - self._warned_at > 60:
            self.log.warning("cannot read the adapter registry (%s); %s", e, self.serving)
            self._warned_at = time.monotonic()

    def _after(self) -> None:
        if self.also is not None:
            try:
                self.also()
            except Exception:
                self.log.exception("the adapter registry watcher's follow-up failed")

    def _hand_over(self, before: Any, read: Manifest | Exception) -> tuple[Manifest | None, Any]:
        """The half of a poll after the read: report a failure, drop a read that a write of this
        process overtook, hand the rest to ``on_manifest``. (manifest or None, what it returned)."""
        if isinstance(read, Exception):
            self.on_error(read)
            return None, None
        if before != self.writes():
            return None, None
        try:
            return read, self.on_manifest(read)
        except Exception:
            self.log.exception("applying the adapter registry failed")
            return read, None

    def poll(self) -> Manifest | None:
        """Read once, now, and hand the manifest over (blocking I/O: a thread, not an event loop).
        Never raises; None when the store did not answer or the read was dropped."""
        before = self.writes()
        try:
            read: Manifest | Exception = self.registry.read()
        except Exception as e:
            read = e
        manifest, _ = self._hand_over(before, read)
        self._after()
        return manifest

    async def poll_async(self) -> Manifest | None:
        """``poll`` from an event loop: the read runs in a worker thread, ``on_manifest`` (which
        may be a coroutine function) on the loop."""
        before = self.writes()
        try:
            read: Manifest | Exception = await asyncio.to_thread(self.registry.read)
        except Exception as e:
            read = e
        manifest, pending = self._hand_over(before, read)
        if inspect.isawaitable(pending):
            try:
                await pending
            except Exception:
                self.log.exception("applying the adapter registry failed")
        self._after()
        return manifest

    # ---- the two ways to run it ----------------------------------------------------------------

    async def run(self) -> None:
        """Poll now, then every ``period_s``, until cancelled (an engine replica's background task)."""
        while True:
            await self.poll_async()
            await asyncio.sleep(self.period_s)

    def start_thread(self, name: str = "adapter-registry") -> None:
        """Poll every ``period_s`` on a daemon thread, first after one period (the caller polls
        once itself at start), until ``stop``."""
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
