"""The adapter store interface: where a tenant's PEFT folder comes from.

One backend per file (local.py, ...). The engine only ever sees a local folder path; a
remote backend's job is to make one (download into a disk cache) and say so when it can't.
"""

from __future__ import annotations

from typing import Protocol


class AdapterStore(Protocol):
    def list_ids(self) -> list[str]:
        """All adapter IDs the store can serve."""

    def exists(self, adapter_id: str) -> bool:
        """Whether the store holds this adapter (cheap; no download)."""

    def local_path(self, adapter_id: str) -> str:
        """A local folder with adapter_config.json + adapter_model.safetensors.

        Raises AdapterNotFoundError for an unknown ID, AdapterStoreUnavailableError when the
        store cannot be reached.
        """
