"""The scheduler: which requests run in the next step, and how many tokens each computes.

Each step has a token budget (``max_num_batched_tokens``): one token for every decoding row
first, whatever adapter each uses, then more of each prompt being prefilled in chunks, then new
prompts in the waiting queue's order. A request joins at the next step and leaves the moment it
finishes.

KV memory (kv_cache.py's ``KVCacheManager``, owned here): a sequence takes blocks as it grows
and a new request starts from the blocks of its longest cached prefix (same adapter version and
salt only). When the pool runs out, the newest running sequence is preempted: its blocks are
freed and it waits at the head of its tenant's queue, to be recomputed from its prompt and the
tokens it already produced (its output so far is kept and never re-sent). A request is never
failed for lack of KV memory; one that could never fit is refused with a 400 when it arrives
(``check_fits``). The scheduler decides; the KV manager holds the blocks.

The waiting queue is the scheduling policy (``policy``, as vLLM's ``SchedulerConfig.policy``):
"fair" (``FairQueue``) is the only one. A different admission order is a new queue class with
``FairQueue``'s methods, registered in ``POLICIES``.

What the scheduler ends (aborted requests) it returns in ``SchedulerOutput.aborted`` for the
engine to finish: nothing here emits an output or knows about adapters' pins.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from serve_app.engine.config import EngineConfig
from serve_app.engine.kv_cache import KVCacheManager
from serve_app.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)

_MIN_CHUNK = 16  # a chunked prefill starts with at least this many tokens (or the whole prompt)


class FairQueue:
    """The waiting queue: round-robin across tenants, FIFO within one.

    A deque per tenant key (the request's adapter ID, ``None`` for the base model) and a
    rotation of the keys that have waiting requests. ``popleft`` takes the head of the first
    key's deque and moves that key to the back of the rotation; a key whose deque empties
    leaves it, and rejoins at the back with its next request. O(1) per operation. Drop-in for
    the ``deque`` it replaces (``append``, ``popleft``, ``len``, truth, iteration).

    Why round-robin: when more requests wait than the batch has free rows, one tenant's 100
    queued requests then delay another tenant's single request by one admission, not by 100.
    """

    def __init__(self) -> None:
        self._queues: OrderedDict[str | None, deque[Request]] = OrderedDict()
        self._len = 0

    @staticmethod
    def key(req: Request) -> str | None:
        if req.tenant is not None:
            return "tenant:" + req.tenant
        return req.adapter.adapter_id if req.adapter is not None else None

    def append(self, req: Request) -> None:
        q = self._queues.get(k := self.key(req))
        if q is None:
            q = self._queues[k] = deque()
        q.append(req)
        self._len += 1

    def appendleft(self, req: Request, *, jump: bool = True) -> None:
        """Put a preempted request back first: the head of its tenant's queue, its tenant next
        (``jump=False``: its tenant keeps its place in the rotation; a preemption for the row
        share must not hand the freed row straight back)."""
        q = self._queues.get(k := self.key(req))
        if q is None:
            q = self._queues[k] = deque()
        q.appendleft(req)
        if jump:
            self._queues.move_to_end(k, last=False)
        self._len += 1

    def promote(self, key: str | None) -> None:
        """Move a waiting tenant to the front of the rotation (it is admitted next)."""
        self._queues.move_to_end(key, last=False)

    def keys(self) -> list[str | None]:
        """The waiting tenants' keys, in rotation order."""
        return list(self._queues)

    def peek(self, skip: set | frozenset = frozenset()) -> Request | None:
        """The request ``popleft`` would return next, passing over the tenants in ``skip``
        (None when every waiting tenant is skipped)."""
        if not self._len:
            raise IndexError("peek into an empty FairQueue")
        if not skip:
            return next(iter(self._queues.values()))[0]
        return next((q[0] for k, q in self._queues.items() if k not in skip), None)

    def remove(self, req: Request) -> Request:
        """Take ``req``, the head of its tenant's queue (from ``peek``); its tenant goes to the
        back of the rotation, as ``popleft`` does."""
        k = self.key(req)
        q = self._queues[k]
        if q[0] is not req:
            raise ValueError("FairQueue.remove takes the head of a tenant's queue")
        q.popleft()
        if q:
            self._queues.move_to_end(k)
        else:
            del self._queues[k]
        self._len -= 1
        return req

    def popleft(self) -> Request:
        if not self._len:
            raise IndexError("pop from an empty FairQueue")
        k, q = next(iter(self._queues.items()))
        req = q.popleft()
        if q:
            self._queues.move_to_end(k)
        else:
            del self._queues[k]
        self._len -= 1
        return req

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self):
        for q in list(self._queues.values()):
            yield from list(q)

    def tenants(self) -> int:
        """How many tenants have requests waiting."""
        return len(self._queues)


POLICIES = {"fair": FairQueue}  # the waiting queue's class per policy name


@dataclass
class SchedulerOutput:
    """One step's work. ``rows``: ``(request, tokens to compute)``, the ``num_decode`` decode rows
    (one token each) first. ``new_blocks``: blocks handed out for writing since the last step,
    for the runner to zero before the forward. ``aborted``: requests the scheduler let go (their
    blocks are back); the engine finishes them."""

    rows: list[tuple[Request, int]] = field(default_factory=list)
    num_decode: int = 0
    new_blocks: list[int] = field(default_factory=list)
    aborted: list[Request] = field(default_factory=list)


class Scheduler:
    """The waiting queue, the running rows and the per-step plan (engine thread, under the
    engine's lock). ``attn_ctx_ref`` and ``logits_cost`` are the model's cost units (the
    runner's) that ``_chunk`` charges a prompt token with. ``kv`` None: rows that hold no KV
    blocks (static_batch.py's scheduler, which overrides every method that touches it)."""

    def __init__(self, config: EngineConfig, kv: KVCacheManager | None, *, attn_ctx_ref: float = math.inf,
                 logits_cost: float = 0.0, policy: str = "fair"):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; one of {sorted(POLICIES)}")
        self.config = config
        self.kv = kv
        self.attn_ctx_ref = attn_ctx_ref
        self.logits_cost = logits_cost
        self.policy = policy
        self.waiting = POLICIES[policy]()  # round-robin across tenants (see FairQueue)
        self.running: list[Request] = []  # holding KV blocks, oldest first (decoding or mid-prefill)
        self.preemptions = 0
        self.share_preemptions = 0  # of those, for the row share (``_share_rows``)

    # ---- requests in and out (under the engine's lock) --------------------------------------

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_running(self) -> list[Request]:
        """Empty ``running`` and return what it held (a step that failed as a whole fails them)."""
        running, self.running = self.running, []
        return running

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise InvalidRequestError (400) for a request that could never fit in the KV pool."""
        self.kv.check_fits(prompt_tokens, max_tokens)

    def finish(self, req: Request) -> None:
        """``req`` is done (its last output is being made): its blocks go back now; it leaves
        ``running`` at the next ``schedule``."""
        req.status = RequestStatus.FINISHED
        self.kv.free(req)

    def computed(self, req: Request, take: int, *, cache: bool = True) -> None:
        """A forward computed ``take`` tokens of ``req`` (``cache`` False: its output was
        non-finite, its blocks must not enter the prefix cache)."""
        self.kv.computed(req, take, cache=cache)

    def forget_adapter(self, adapter: str) -> None:
        """A retired adapter version's prefix-cache counts go (``PrefixStats.forget``)."""
        self.kv.forget(adapter)

    def stats(self) -> dict:
        prefilling = sum(1 for r in self.running if r.length - r.num_computed > 1)
        return {
            "running": len(self.running) - prefilling,
            "prefilling": prefilling,
            "waiting": len(self.waiting),
            "waiting_tenants": self.waiting.tenants(),
        }

    def kv_stats(self) -> dict | None:
        """The KV pool's numbers and the preemption counts (None: this scheduler holds no KV)."""
        return {**self.kv.stats(), "preemptions": self.preemptions, "share_preemptions": self.share_preemptions}

    # ---- the plan -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """This step's work, decode rows first (under the lock).

        The per-step token budget (``max_num_batched_tokens``): one token for each decoding
        row, then more of each prompt being prefilled in chunks, then waiting prompts (fair
        order), whole while they fit and the first one that does not in chunks. A long prompt is
        spread over steps while every running row keeps getting a token per step, so one
        tenant's long prompt never stalls the others. A row that needs a block when the pool is
        empty takes one from the newest running row not yet scheduled (preemption); when there
        is none, it is preempted itself.
        """
        cfg, kv = self.config, self.kv
        aborted = []
        for req in self.running:
            if req.aborted and not req.finished:
                self.finish(req)
                aborted.append(req)
        self.running = [r for r in self.running if not r.finished]
        if self.waiting and len(self.running) >= cfg.max_num_seqs:
            self._share_rows()
        budget = cfg.max_num_batched_tokens
        sched: dict[Request, int] = {}
        decoding = [r for r in self.running if r.length - r.num_computed == 1]
        prefilling = [r for r in self.running if r.length - r.num_computed > 1]
        for req in decoding:
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted by a row before it
                continue
            if self._grow(req, 1, sched):
                sched[req] = 1
                budget -= 1
            else:
                self._preempt(req)
        # Prefill: the budget left is shared among the tenants with prefill work (prompts being
        # chunked, or waiting while a row is free). Each takes at most its share in a first pass,
        # so one tenant's long prompts (or echo requests) cannot hold back every other tenant's
        # first token for their whole prefill; a second pass gives what is left to the rows
        # that could use more.
        free_rows = len(self.running) < cfg.max_num_seqs
        tenants = {FairQueue.key(r) for r in prefilling} | (set(self.waiting.keys()) if free_rows else set())
        share = max(_MIN_CHUNK, budget // max(1, len(tenants)))
        used: dict[str | None, int] = {}
        costs: dict[Request, int] = {}

        def prefill(req: Request, room: int) -> None:
            nonlocal budget
            take, cost = self._chunk(req.num_computed, req.length - req.num_computed, room, self._weight(req))
            if take <= sched.get(req, 0):
                return
            if self._grow(req, take, sched):
                sched[req] = take
                budget -= cost - costs.get(req, 0)
                costs[req] = cost
                k = FairQueue.key(req)
                used[k] = used.get(k, 0) + cost
            else:
                self._preempt(req)

        for req in prefilling:
            if budget > 0 and req.status is RequestStatus.RUNNING:
                prefill(req, min(budget, share - used.get(FairQueue.key(req), 0)))
        watermark = max(1, kv.num_blocks // 100)  # left free for the running rows' next blocks
        full: set[str | None] = {k for k, u in used.items() if u >= share}  # tenants at their share this step
        while self.waiting and len(self.running) < cfg.max_num_seqs and budget > 0:
            req = self.waiting.peek(skip=full)
            if req is None:
                break
            if req.aborted:
                self.finish(self.waiting.remove(req))
                aborted.append(req)
                continue
            key = FairQueue.key(req)
            limit = req.length - 1  # at least one token is computed: its logits are the next token's
            if req.scores_prompt:  # its prompt's logprobs come from computing every position
                limit = 0
            hit = kv.computed_blocks(req, limit)
            remaining = req.length - hit.num_tokens
            room = share - used.get(key, 0)
            take, cost = self._chunk(hit.num_tokens, remaining, min(budget, room), self._weight(req))
            need = kv.new_blocks_needed(hit, take)
            if need > kv.num_free - (watermark if self.running else 0):
                kv.release(hit)
                break
            if take < remaining and take < _MIN_CHUNK:
                kv.release(hit)
                if room >= budget:  # the step's budget, not this tenant's share, is what ran out
                    break
                full.add(key)  # no room for this tenant this step; others may fit
                continue
            self.waiting.remove(req)
            kv.allocate_slots(req, take, hit)  # fits: checked against num_free above
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            sched[req] = take
            costs[req] = cost
            used[key] = used.get(key, 0) + cost
            budget -= cost
            if used[key] >= share:
                full.add(key)
        for req in [r for r in self.running if r.status is RequestStatus.RUNNING and r.length - r.num_computed > 1]:
            if budget <= 0:  # the rest
                break
            if sched.get(req, 0) < req.length - req.num_computed:
                prefill(req, budget + costs.get(req, 0))
        rows = list(sched.items())
        num_decode = next((i for i, (r, take) in enumerate(rows) if r.length - r.num_computed != 1), len(rows))
        return SchedulerOutput(rows, num_decode, kv.take_new_blocks(), aborted)

    def _chunk(self, start: int, remaining: int, budget: int, weight: float = 1.0) -> tuple[int, int]:
        """How many of a sequence's ``remaining`` tokens from position ``start`` fit in ``budget``,
        and what they cost: a token costs ``weight`` (1: its projections and MLP; more when its
        logits are computed too), plus its attention over the context before it in those units
        (``attn_ctx_ref``). A chunk deep into a long prompt attends to everything before it, so it
        takes fewer tokens and the step stays as short as one early in the prompt: the running
        rows' inter-token gap stays bounded all the way."""
        if remaining == 1:  # a decode row (or a prompt's last token): its attention reads, it is not a chunk
            return (1, 1) if budget >= 1 else (0, 0)
        ref = self.attn_ctx_ref

        def cost(n: int) -> int:
            return int(n * weight) + int(n * (start + n / 2) / ref)

        b = weight + start / ref
        n = min(remaining, max(0, int((math.sqrt(b * b + 2 * budget / ref) - b) * ref)))
        while n < remaining and cost(n + 1) <= budget:
            n += 1
        while n > 0 and cost(n) > budget:
            n -= 1
        if n == 0 and budget >= 1:  # deep in a very long prompt: one token a step, never starved
            return 1, budget
        return n, cost(n)

    def _weight(self, req: Request) -> float:
        """A prompt token's cost for ``_chunk``: 1, plus the logits when its logprobs are asked
        (``logits_cost``: the lm_head's FLOPs over the decoder's, 0.27 on SmolLM2), so echo with
        logprobs is charged to the token budget like any other prefill work."""
        return 1.0 + self.logits_cost if req.scores_prompt else 1.0

    def _share_rows(self) -> None:
        """Every row is taken and a tenant waits: if it holds less than its share of the rows
        (``max_num_seqs`` over the tenants with work, at least 1) while another holds more,
        preempt that tenant's newest row and admit the waiting tenant next. One tenant's 64 long
        requests then no longer hold every row until one of them ends. At most one row a step;
        the preempted request waits at the head of its own tenant's queue (its cached prefix
        blocks make the re-run cheap)."""
        held: dict[str | None, int] = {}
        for r in self.running:
            k = FairQueue.key(r)
            held[k] = held.get(k, 0) + 1
        waiting = self.waiting.keys()
        share = max(1, self.config.max_num_seqs // len(set(held) | set(waiting)))
        top = max(held, key=held.get)
        if held[top] <= share:
            return
        starved = next((k for k in waiting if held.get(k, 0) < share and k != top), None)
        if starved is None:
            return
        victim = next(r for r in reversed(self.running) if FairQueue.key(r) == top)
        self._preempt(victim, jump=False)
        self.waiting.promote(starved)
        self.share_preemptions += 1

    def _grow(self, req: Request, take: int, sched: dict) -> bool:
        """Give ``req`` the blocks for ``take`` more tokens, preempting newer unscheduled rows."""
        while not self.kv.allocate_slots(req, take):
            victim = next((r for r in reversed(self.running) if r is not req and r not in sched), None)
            if victim is None:
                return False
            self._preempt(victim)
        return True

    def _preempt(self, req: Request, *, jump: bool = True) -> None:
        """Free a running row's blocks; it waits first in line and is recomputed when readmitted."""
        self.kv.free(req, recompute=True)
        req.status = RequestStatus.WAITING
        self.running.remove(req)
        self.waiting.appendleft(req, jump=jump)
        self.preemptions += 1
        req.preemptions += 1
        logger.debug("preempted %s (%d tokens so far) for lack of KV blocks", req.request_id, req.length)
