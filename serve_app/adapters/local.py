"""A local folder store: ``<root>/<adapter_id>/adapter_config.json`` (+ weights).

Folders are read in place (no disk cache). The root folder missing is "store unavailable"
(a mount that went away), a sub-folder missing is "adapter not found". Error messages reach
tenants, so they never hold a path: the path and the OS error are logged here instead.

Conditional writes (the registry's manifest) compare the file's sha256 under an flock on a
hidden sidecar ``.<name>.lock``: every process on the machine that shares the folder is
serialized, and a writer whose read is out of date gets WriteConflictError.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from serve_app.adapters.ids import is_valid_id, validate_adapter_id
from serve_app.adapters.store import FileInfo, WriteConflictError
from serve_app.errors import AdapterNotFoundError, AdapterStoreUnavailableError

logger = logging.getLogger(__name__)


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_last_warning: dict[str, float] = {}


def _warn_limited(key: str, msg: str, *args) -> None:
    """Log what a tenant's error leaves out, at most every 30 s per kind (a missing mount is
    hit by every request)."""
    now = time.monotonic()
    if now - _last_warning.get(key, -1e9) >= 30:
        _last_warning[key] = now
        logger.warning(msg, *args)


class LocalAdapterStore:
    is_local = True
    tier = "disk"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    # ---- adapters at the root --------------------------------------------------------------

    def _dir(self, adapter_id: str) -> Path:
        return self.root / validate_adapter_id(adapter_id)

    def _check_root(self) -> None:
        if not self.root.is_dir():
            _warn_limited(f"root:{self.root}", "adapter store folder %s does not exist (or is not mounted)", self.root)
            raise AdapterStoreUnavailableError(
                "the adapter store is unavailable (its folder is missing or not mounted); adapters already "
                "loaded keep serving; retry later"
            )

    def _unavailable(self, what: str, path: Path, e: OSError) -> AdapterStoreUnavailableError:
        _warn_limited(f"{what}:{path}", "adapter store: cannot %s %s (%s)", what, path, e)
        return AdapterStoreUnavailableError(
            f"the adapter store cannot {what} a file right now ({type(e).__name__}, errno {e.errno}); retry later"
        )

    def list_ids(self) -> list[str]:
        self._check_root()
        return sorted(
            p.name for p in self.root.iterdir() if is_valid_id(p.name) and (p / "adapter_config.json").is_file()
        )

    def exists(self, adapter_id: str) -> bool:
        if self._dir(adapter_id).is_dir():
            return True
        self._check_root()
        return False

    def local_path(self, adapter_id: str) -> str:
        path = self._dir(adapter_id)
        if not path.is_dir():
            self._check_root()
            raise AdapterNotFoundError(f"adapter '{adapter_id}' not found in the adapter store")
        return str(path)

    # ---- generic file access (relative paths) ----------------------------------------------

    def _path(self, rel: str) -> Path:
        parts = [p for p in rel.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"invalid store path {rel!r}")
        return self.root.joinpath(*parts)

    def list_files(self, rel: str) -> dict[str, FileInfo]:
        path = self._path(rel)
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            self._check_root()
            return {}
        except OSError as e:
            raise self._unavailable("list", path, e) from None
        out = {}
        for e in entries:
            if e.is_file():
                st = e.stat()
                out[e.name] = FileInfo(size=st.st_size, tag=str(st.st_mtime_ns))
        return out

    def local_dir(self, rel: str) -> str:
        return str(self._path(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self._path(rel).read_bytes()
        except FileNotFoundError:
            self._check_root()
            return None
        except OSError as e:
            raise self._unavailable("read", self._path(rel), e) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        self._check_root()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            raise self._unavailable("write", path, e) from None

    def read_versioned(self, rel: str) -> tuple[bytes | None, str | None]:
        data = self.read_bytes(rel)
        return data, None if data is None else _tag(data)

    def write_if(self, rel: str, data: bytes, expected: str | None) -> str | None:
        path = self._path(rel)
        self._check_root()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path.parent / f".{path.name}.lock", "a+")
        except OSError as e:
            raise self._unavailable("write", path, e) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self.read_bytes(rel)
                if (None if current is None else _tag(current)) != expected:
                    raise WriteConflictError(
                        f"{path.name} was changed by another writer since it was read; retry the request"
                    )
                self.write_bytes(rel, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return _tag(data)

    def get_file(self, rel: str, local_path: str, callback=None) -> None:
        try:
            shutil.copyfile(self._path(rel), local_path)
        except FileNotFoundError:
            self._check_root()
            logger.info("adapter store: %s does not exist", self._path(rel))
            raise AdapterNotFoundError(f"{rel.rsplit('/', 1)[-1]} of an adapter is not in the adapter store") from None
        except OSError as e:
            raise self._unavailable("read", self._path(rel), e) from None

    def put_file(self, local_path: str, rel: str) -> None:
        path = self._path(rel)
        self._check_root()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise self._unavailable("write", path, e) from None

    def delete_tree(self, rel: str) -> None:
        path = self._path(rel)
        if path == self.root:
            raise ValueError("refusing to delete the store root")
        if not path.exists():
            return
        # Rename first: readers see the folder or nothing, never half of it.
        trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, rel: str):
        path = self._path(rel)
        self._check_root()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
