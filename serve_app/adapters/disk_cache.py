"""A size-capped LRU of downloaded adapter folders on local disk, shared by a node's replicas.

Layout: ``<root>/<sha256(key)[:32]>/`` holds the adapter files and ``.entry.json`` (key, bytes,
fingerprint of the store listing it came from, and ``content``: store.content_fingerprint of
the files as written). A caller that knows which content a key must hold (the registry records
it per version) compares ``content`` on every hit and discards a copy of other content.
Recency is the mtime of ``.entry.json``, touched on every hit, so all processes on the node
share one LRU order without a daemon.

Safety across processes: an entry is filled in a private ``.tmp-*`` folder and renamed into
place (readers see a complete folder or none); inserts and evictions run under an flock on
``<root>/.lock``; an evicted folder is renamed away before it is deleted. The entry being
inserted is never evicted, so one adapter larger than the cap is kept alone (with a warning).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from serve_app.adapters.store import content_fingerprint

logger = logging.getLogger(__name__)

META = ".entry.json"
_STALE_TMP_S = 3600


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: str
    nbytes: int
    fingerprint: str
    content: str = ""  # store.content_fingerprint of the cached files ("" in entries from before it)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != META)


class DiskCache:
    def __init__(self, root: str | Path, max_bytes: int, *, on_evict: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()

    def _dir(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:32]

    @contextlib.contextmanager
    def _locked(self):
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_meta(self, folder: Path) -> dict | None:
        try:
            return json.loads((folder / META).read_text())
        except (OSError, ValueError):
            return None

    # ---- lookups ---------------------------------------------------------------------------

    def get(self, key: str) -> CacheEntry | None:
        """The entry for ``key`` (marked most recently used), or None."""
        folder = self._dir(key)
        meta = self._read_meta(folder)
        if meta is None or meta.get("key") != key:
            return None
        with contextlib.suppress(OSError):
            os.utime(folder / META)
        return CacheEntry(key, str(folder), int(meta.get("bytes", 0)), str(meta.get("fingerprint", "")),
                          str(meta.get("content", "")))

    def put(self, key: str, fill: Callable[[Path], None], *, fingerprint: str = "",
            check: Callable[[str], None] | None = None) -> CacheEntry:
        """Fill a new entry with ``fill(tmp_folder)`` and publish it, replacing any old one.

        ``check(content_fingerprint)`` runs before publishing; what it raises leaves nothing behind.
        """
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            fill(tmp)
            nbytes = _folder_bytes(tmp)
            content = content_fingerprint(tmp)
            if check is not None:
                check(content)
            (tmp / META).write_text(json.dumps({"key": key, "bytes": nbytes, "fingerprint": fingerprint,
                                                "content": content, "created": time.time()}))
            folder = self._dir(key)
            with self._locked():
                self._evict_for(nbytes, keep=folder)
                if folder.exists():
                    self._remove_folder(folder)
                os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
        return CacheEntry(key, str(folder), nbytes, fingerprint, content)

    def remove(self, key: str) -> bool:
        folder = self._dir(key)
        with self._locked():
            if not folder.exists():
                return False
            self._remove_folder(folder)
            return True

    def entries(self) -> list[tuple[float, Path, dict]]:
        """(last use, folder, meta) of every complete entry, least recently used first."""
        out = []
        for p in self.root.iterdir():
            if p.name.startswith("."):
                continue
            try:
                mtime = (p / META).stat().st_mtime
            except OSError:
                continue
            meta = self._read_meta(p)
            if meta is not None:
                out.append((mtime, p, meta))
        out.sort(key=lambda e: e[0])
        return out

    def total_bytes(self) -> int:
        return sum(int(m.get("bytes", 0)) for _, _, m in self.entries())

    def keys(self) -> list[str]:
        return [m["key"] for _, _, m in self.entries()]

    # ---- eviction (under the lock) -----------------------------------------------------------

    def _evict_for(self, incoming: int, keep: Path) -> None:
        entries = [e for e in self.entries() if e[1] != keep]
        total = sum(int(m.get("bytes", 0)) for _, _, m in entries)
        for _, folder, meta in entries:
            if total + incoming <= self.max_bytes:
                break
            self._remove_folder(folder)
            total -= int(meta.get("bytes", 0))
            logger.info("disk cache: evicted %s (%d bytes, LRU)", meta.get("key"), meta.get("bytes", 0))
            if self.on_evict is not None:
                self.on_evict(str(meta.get("key")))
        if incoming > self.max_bytes:
            logger.warning("disk cache: an adapter of %d bytes is larger than the cache cap %d; kept alone",
                           incoming, self.max_bytes)

    def _remove_folder(self, folder: Path) -> None:
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _sweep_tmp(self) -> None:
        """Leftovers of a process killed mid-download (older than an hour: not someone's live fill)."""
        now = time.time()
        for p in self.root.glob(".t*-*"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)
