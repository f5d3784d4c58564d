"""A local folder store: ``<root>/<adapter_id>/adapter_config.json`` (+ weights).

Folders are read in place (no disk cache). The root folder missing is "store unavailable"
(a mount that went away), a sub-folder missing is "adapter not found".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from serve_app.adapters.ids import validate_adapter_id
from serve_app.adapters.store import FileInfo, is_valid_id
from serve_app.errors import AdapterNotFoundError, AdapterStoreUnavailableError


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
            raise AdapterStoreUnavailableError(
                f"adapter store folder {self.root} does not exist (or is not mounted); adapters already "
                "loaded keep serving"
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
            raise AdapterStoreUnavailableError(f"adapter store folder {path} cannot be read ({e})") from None
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
            raise AdapterStoreUnavailableError(f"cannot read {self._path(rel)} ({e})") from None

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
            raise AdapterStoreUnavailableError(f"cannot write {path} ({e})") from None

    def get_file(self, rel: str, local_path: str, callback=None) -> None:
        try:
            shutil.copyfile(self._path(rel), local_path)
        except FileNotFoundError:
            self._check_root()
            raise AdapterNotFoundError(f"{self._path(rel)} does not exist") from None

    def put_file(self, local_path: str, rel: str) -> None:
        path = self._path(rel)
        self._check_root()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise AdapterStoreUnavailableError(f"cannot write {path} ({e})") from None

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
