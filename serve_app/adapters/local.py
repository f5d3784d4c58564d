"""A local folder store: ``<root>/<adapter_id>/adapter_config.json`` (+ weights)."""

from __future__ import annotations

from pathlib import Path

from serve_app.adapters.ids import validate_adapter_id
from serve_app.errors import AdapterNotFoundError, AdapterStoreUnavailableError


class LocalAdapterStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, adapter_id: str) -> Path:
        return self.root / validate_adapter_id(adapter_id)

    def list_ids(self) -> list[str]:
        if not self.root.is_dir():
            raise AdapterStoreUnavailableError(f"adapter store folder {self.root} does not exist")
        return sorted(p.name for p in self.root.iterdir() if (p / "adapter_config.json").is_file())

    def exists(self, adapter_id: str) -> bool:
        return self._dir(adapter_id).is_dir()

    def local_path(self, adapter_id: str) -> str:
        path = self._dir(adapter_id)
        if not path.is_dir():
            if not self.root.is_dir():
                raise AdapterStoreUnavailableError(f"adapter store folder {self.root} does not exist")
            raise AdapterNotFoundError(f"adapter '{adapter_id}' not found in the adapter store")
        return str(path)
