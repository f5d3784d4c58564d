"""``open_store``: the backend for a store URI (a local folder, or any fsspec URI).

It sits beside the backends (local.py, fsspec_store.py) and above the interface they
implement (store.py), so the interface imports no backend.
"""

from __future__ import annotations

from serve_app.adapters.config import StoreConfig
from serve_app.adapters.fsspec_store import FsspecAdapterStore
from serve_app.adapters.local import LocalAdapterStore
from serve_app.adapters.store import AdapterStore


def open_store(uri: str, config: StoreConfig | None = None) -> AdapterStore:
    """A local folder (a path or file://) or an fsspec URI (s3://bucket/prefix, ...)."""
    config = config or StoreConfig()
    if "://" not in uri or uri.startswith("file://"):
        return LocalAdapterStore(uri[len("file://"):] if uri.startswith("file://") else uri)
    return FsspecAdapterStore(uri, config.storage_options, timeout_s=config.timeout_s)
