"""Paged KV cache bookkeeping: which block holds what. Pure Python; the tensors are the runner's
(model_runner.py).

Why blocks: a dense ``[max_num_seqs, capacity]`` cache reserves every slot for the longest
sequence, so memory follows max_num_seqs x the longest prompt instead of the live tokens. Here
one pool of fixed-size blocks (``block_size`` tokens each) is shared by every sequence; a
sequence holds a block table (a list of block IDs) that grows as it does, and gives its blocks
back when it finishes or is preempted. Waste is at most one partly filled block per sequence.

Prefix cache: a FULL block is keyed by ``(parent key, adapter key, its token ids)``, where the
parent key identifies the content of every block before it (a chain) and the adapter key is
the adapter's ``id@vN`` together with the identity of its load (``ResidentAdapter.load_id``),
or ``None`` for the base model. KV computed under one adapter, or one version or load of it, is
never found by a request under another: the bug class of vllm#30931. Keys are compared by
equality, not by a hash alone, so a tenant who crafts colliding token ids gets a miss, never
another tenant's KV (vLLM moved to sha256 chains for the same reason).

Blocks nobody references but that hold a cached prefix stay in an LRU (``evictable``) and are
reused on a hit; a fresh allocation takes the lowest-numbered never-cached free block first
(decode attention on CPU reads the pool's low blocks in place, see attention.py), then evicts the
least recently used cached one. Every block handed out for writing is listed in ``dirty``; the
engine hands that list to the runner, which zeroes them before the forward that first writes
them, so no stale value of an earlier owner (even a non-finite one) ever meets another tenant's
attention weights.

Two layers, as in vLLM (``BlockPool`` under ``KVCacheManager``) and nano-vllm (``BlockManager``):
``BlockPool`` knows blocks only; ``KVCacheManager`` works per sequence (its block table, its
prefix hit, its full blocks entering the index) and is what the scheduler calls. The scheduler
never touches a block itself.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serve_app.errors import InvalidRequestError

if TYPE_CHECKING:
    from serve_app.engine.lora.manager import ResidentAdapter
    from serve_app.engine.request import Request

ROOT = 0  # the parent key of a sequence's first block
AdapterKey = tuple[str, int] | None  # (adapter id@vN, load id), None for the base model


@dataclass
class PrefixStats:
    """Prompt tokens looked up in / found in the prefix cache, per adapter (None: base)."""

    queried: dict[str | None, int] = field(default_factory=dict)
    hit: dict[str | None, int] = field(default_factory=dict)
    # What forgotten versions had counted, so the totals below never go back.
    forgotten_queried: int = 0
    forgotten_hit: int = 0

    def add(self, adapter: str | None, queried: int, hit: int) -> None:
        self.queried[adapter] = self.queried.get(adapter, 0) + queried
        self.hit[adapter] = self.hit.get(adapter, 0) + hit

    def forget(self, adapter_key: str | tuple | None) -> bool:
        """Drop one adapter version's counts (its ``id@vN``, or its cache key ``(id@vN, load
        id)``), e.g. once the version retires. Without this the dicts (and the per-adapter
        hit-rate gauge exported from them) grow by one entry per version ever served. Its
        gauge series then stops being set and Ray's agent drops it (see serve_app/metrics.py).
        True if there was something to drop. The base model (None) is never forgotten."""
        adapter = adapter_key[0] if isinstance(adapter_key, tuple) else adapter_key
        if adapter is None or adapter not in self.queried:
            return False
        self.forgotten_queried += self.queried.pop(adapter)
        self.forgotten_hit += self.hit.pop(adapter, 0)
        return True

    @property
    def total_queried(self) -> int:
        """Prompt tokens ever looked up, forgotten versions included (monotonic)."""
        return sum(self.queried.values()) + self.forgotten_queried

    @property
    def total_hit(self) -> int:
        """Prompt tokens ever found, forgotten versions included (monotonic)."""
        return sum(self.hit.values()) + self.forgotten_hit


class BlockPool:
    """Reference-counted KV blocks, their free lists and the prefix cache index."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self._free = list(range(num_blocks))  # min-heap of never-cached free blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free, holding a cached prefix; LRU first
        self._index: dict[tuple, tuple[int, int]] = {}  # (parent, adapter key, tokens) -> (node, block)
        self._key_of: dict[int, tuple] = {}  # block -> its index key (cached blocks only)
        self._nodes = itertools.count(ROOT + 1)
        self.dirty: list[int] = []  # handed out since the runner last zeroed
        self.prefix = PrefixStats()
        self.evictions = 0

    # ---- counts --------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (never-cached ones and evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks whose content is in the prefix index (in use or evictable)."""
        return len(self._key_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation ----------------------------------------------------------------------

    def allocate(self) -> int | None:
        """A block to write into (ref 1), or None when the pool is exhausted."""
        if self._free:
            block = heapq.heappop(self._free)
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._index[self._key_of.pop(block)]
            self.evictions += 1
        else:
            return None
        self.ref[block] = 1
        self.dirty.append(block)
        return block

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; tail blocks first, so they are evicted first."""
        for block in reversed(blocks):
            self.ref[block] -= 1
            if self.ref[block] < 0:
                raise RuntimeError(f"KV block {block} freed more often than taken")
            if self.ref[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    heapq.heappush(self._free, block)

    def take_dirty(self) -> list[int]:
        out, self.dirty = self.dirty, []
        return out

    # ---- prefix cache --------------------------------------------------------------------

    def lookup(self, key: AdapterKey, tokens: list[int], limit: int) -> tuple[list[int], list[int]]:
        """The longest cached run of full blocks that starts ``tokens``, over at most ``limit``
        tokens: (blocks, their node keys). Each block returned has gained a reference."""
        if not self.prefix_caching:
            return [], []
        bs = self.block_size
        blocks, nodes = [], []
        parent = ROOT
        for i in range(limit // bs):
            hit = self._index.get((parent, key, tuple(tokens[i * bs : (i + 1) * bs])))
            if hit is None:
                break
            parent, block = hit
            if self.ref[block] == 0:
                del self._evictable[block]
            self.ref[block] += 1
            blocks.append(block)
            nodes.append(parent)
        return blocks, nodes

    def register(self, parent: int, key: AdapterKey, tokens: tuple[int, ...], block: int) -> int:
        """Index a block that just became full; returns its node key (the next block's parent).

        When the same content is already indexed (another sequence computed it first), that
        entry's node key is returned and this block stays private: freed, it is reused at once.
        """
        if not self.prefix_caching:
            return ROOT
        k = (parent, key, tokens)
        hit = self._index.get(k)
        if hit is not None:
            return hit[0]
        node = next(self._nodes)
        self._index[k] = (node, block)
        self._key_of[block] = k
        return node

    def stats(self) -> dict:
        q, h = self.prefix.queried, self.prefix.hit
        return {
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "used_blocks": self.num_used,
            "free_blocks": self.num_free,
            "cached_blocks": self.num_cached,
            "evictable_blocks": len(self._evictable),
            "cache_evictions": self.evictions,
            "prefix_caching": self.prefix_caching,
            "prefix_query_tokens": self.prefix.total_queried,  # forgotten versions included: monotonic
            "prefix_hit_tokens": self.prefix.total_hit,
            "prefix_hit_rate_by_adapter": {
                ("base" if a is None else a): round(h.get(a, 0) / n, 4) for a, n in q.items() if n
            },
        }


def cache_key(resident: ResidentAdapter | None, salt: str | None) -> tuple:
    """The prefix-cache key of a request's blocks: its adapter's version and load (None for
    the base), salted with its tenant. Without the salt, the 1.5 ms vs 41 ms first token of a
    hit tells a tenant whether ANOTHER tenant sent a given prompt prefix to the same model
    (the base is shared by every tenant, an adapter by every key that may use it). Requests
    share cached blocks only under equal salts: one tenant's own requests, or keys the
    operator gave one salt (vLLM's ``cache_salt``). ``salt`` None: no salt (the offline API)."""
    return (None if resident is None else (resident.adapter_id, resident.load_id), salt)


@dataclass
class PrefixHit:
    """A request's cached prefix found by ``computed_blocks``: full blocks, their node keys, and
    how many prompt tokens were looked up (for the hit-rate counts). Each block holds a reference
    for the request: pass the hit to ``allocate_slots`` or give it back with ``release``."""

    blocks: list[int]
    nodes: list[int]
    queried: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size


class KVCacheManager:
    """Per-sequence KV bookkeeping over one ``BlockPool``, owned by the scheduler.

    A request's block table (``req.blocks``), its prefix-cache node keys (``req.nodes``) and how
    many of its tokens have KV (``req.num_computed``) are written here and nowhere else. Engine
    thread only, like the pool.
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks, block_size, prefix_caching=prefix_caching)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse (400) a request that could never fit, even alone in the pool."""
        pool = self.pool
        if pool.blocks_for(prompt_tokens + max_tokens) > pool.num_blocks:
            raise InvalidRequestError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) needs more KV memory than "
                f"this replica has ({pool.num_blocks} blocks of {pool.block_size} tokens = "
                f"{pool.num_blocks * pool.block_size} tokens); shorten the prompt or lower max_tokens"
            )

    def computed_blocks(self, req: Request, limit: int) -> PrefixHit:
        """The longest cached prefix of ``req``'s first ``limit`` tokens (under its cache key)."""
        blocks, nodes = self.pool.lookup(req.cache_key, req.tokens(0, limit), limit)
        bs = self.pool.block_size
        return PrefixHit(blocks, nodes, limit // bs * bs, bs)

    def release(self, hit: PrefixHit) -> None:
        """Give back a hit that was not admitted."""
        self.pool.free(hit.blocks)

    def new_blocks_needed(self, hit: PrefixHit, num_tokens: int) -> int:
        """Blocks a request starting from ``hit`` takes for its first ``num_tokens`` tokens past it."""
        return self.pool.blocks_for(hit.num_tokens + num_tokens) - len(hit.blocks)

    def allocate_slots(self, req: Request, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Give ``req`` the blocks for ``num_tokens`` more tokens. ``hit``: the request starts
        here, from its cached prefix (its hit counts toward the prefix stats). False when the pool
        ran out first: the blocks taken so far stay with the request (the scheduler frees a
        victim's and asks again, or preempts the request itself)."""
        pool = self.pool
        if hit is not None:
            pool.prefix.add(req.adapter and req.adapter.adapter_id, hit.queried, hit.num_tokens)
            req.blocks, req.nodes, req.num_computed = hit.blocks, hit.nodes, hit.num_tokens
        need = pool.blocks_for(req.num_computed + num_tokens) - len(req.blocks)
        while need > 0:
            block = pool.allocate()
            if block is None:
                return False
            req.blocks.append(block)
            need -= 1
        return True

    def computed(self, req: Request, num_tokens: int, *, cache: bool = True) -> None:
        """``num_tokens`` more of ``req``'s tokens have their KV written (a forward ran); its
        newly full blocks enter the prefix cache unless ``cache`` is False (non-finite KV is
        never found by a later request)."""
        req.num_computed += num_tokens
        if cache:
            self.cache_full_blocks(req)

    def cache_full_blocks(self, req: Request) -> None:
        """Index the blocks ``req`` just filled in the prefix cache."""
        pool = self.pool
        if not pool.prefix_caching:
            return
        bs = pool.block_size
        while len(req.nodes) < req.num_computed // bs:
            i = len(req.nodes)
            parent = req.nodes[-1] if req.nodes else ROOT
            req.nodes.append(pool.register(parent, req.cache_key, tuple(req.tokens(i * bs, (i + 1) * bs)), req.blocks[i]))

    def free(self, req: Request, *, recompute: bool = False) -> None:
        """Give back every block ``req`` holds. ``recompute``: it was preempted and will be
        computed again from its first token."""
        if req.blocks:
            self.pool.free(req.blocks)
            req.blocks = []
        if recompute:
            req.nodes, req.num_computed = [], 0

    def take_new_blocks(self) -> list[int]:
        """Blocks handed out for writing since the last call: the runner zeroes them first."""
        return self.pool.take_dirty()

    def forget(self, adapter: str) -> None:
        """Drop a retired adapter version's prefix-cache counts (``PrefixStats.forget``)."""
        self.pool.prefix.forget(adapter)

    def stats(self) -> dict:
        return self.pool.stats()
