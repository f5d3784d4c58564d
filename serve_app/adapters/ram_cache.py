"""A bounded host-RAM LRU of parsed, validated adapters (one per LoRA replica).

It sits below the device slots: an adapter evicted from the device pool is usually still
here, and loading it again is one copy into free pool rows -- no disk, no parsing, no
validation. Values are opaque (``LoRAWeights`` in practice); the caller says what each costs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable


class RamCache:
    def __init__(self, max_bytes: int, *, on_evict: Callable[[str], None] | None = None):
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: str, value: Any, nbytes: int) -> bool:
        """Keep ``value``; False when it alone is larger than the cap (not kept)."""
        evicted = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if nbytes > self.max_bytes:
                return False
            while self._items and self._bytes + nbytes > self.max_bytes:
                k, (_, b) = self._items.popitem(last=False)
                self._bytes -= b
                self.evictions += 1
                evicted.append(k)
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
        if self.on_evict is not None:
            for k in evicted:
                self.on_evict(k)
        return True

    def pop(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._bytes -= item[1]
            return item[0]

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "keys": list(self._items)}
