"""The engine: one base model, many adapters, one iteration-level batching loop.

A background thread owns the model. Each iteration schedules one step within a token budget
(``max_num_batched_tokens``): one token for every decoding sequence first, whatever adapter
each uses, then the rest of prompts being prefilled in chunks, then new prompts; all of it is
one forward. A request joins at the next iteration and leaves the moment it finishes. Outputs
go back per step: to asyncio queues (one wake-up per event loop per step, not per token) or to
plain callbacks.

KV memory is paged (kv_cache.py): a sequence takes blocks as it grows and a new request starts
from the blocks of its longest cached prefix (same adapter version only). When the pool runs
out, the newest running sequence is preempted: its blocks are freed and it waits at the head
of its tenant's queue, to be recomputed from its prompt and the tokens it already produced
(its output so far is kept and never re-sent). A request is never failed for lack of KV
memory; one that could never fit is refused with a 400 when it arrives.

Fair admission: when more requests wait than the batch has free rows, they are admitted
round-robin across tenants (adapter IDs; the base model counts as one tenant), FIFO within a
tenant (``FairQueue``). One tenant's 100 queued requests then delay another tenant's single
request by one admission, not by 100. Every running row gets one token per step, whoever owns
it.

Why our own loop and not transformers' continuous-batching manager: on the shared workload
the manager ran at 0.42-0.46x of a plain batched ``generate`` (design/WORKLOAD.md); this loop
runs above it (see benchmarks/engine_bench.py), and it needs per-row adapters, which the
manager has no hook for.

Nothing here knows about Ray Serve.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Callable

import torch

from serve_app.engine.config import EngineConfig
from serve_app.engine.detokenizer import TextAssembler
from serve_app.engine.lora.manager import LoRAManager, ResidentAdapter
from serve_app.engine.lora.weights import LoRAWeights
from serve_app.engine.kv_cache import ROOT
from serve_app.engine.arch import base_shape
from serve_app.engine.loader import load_base_model
from serve_app.engine.model_runner import ModelRunner, SeqChunk
from serve_app.engine.lora.layers import LoRAContext, wrap_lora_layers
from serve_app.api.wire import RequestOutput
from serve_app.engine.offline import OfflineMixin
from serve_app.engine.output_processor import OutputProcessor
from serve_app.engine.request import EngineError, Request, RequestStatus, RequestStream
from serve_app.engine.sampling import SamplingParams
from serve_app.engine.structured import GrammarCache
from serve_app.errors import InvalidRequestError, ServeAppError

logger = logging.getLogger(__name__)

_ids = itertools.count()
_MIN_CHUNK = 16  # a chunked prefill starts with at least this many tokens (or the whole prompt)
_GRAMMAR_INIT = threading.Lock()  # LoRAEngine.grammars(): one GrammarCache per engine


class FairQueue:
    """The waiting queue: round-robin across tenants, FIFO within one.

    A deque per tenant key (the request's adapter ID, ``None`` for the base model) and a
    rotation of the keys that have waiting requests. ``popleft`` takes the head of the first
    key's deque and moves that key to the back of the rotation; a key whose deque empties
    leaves it, and rejoins at the back with its next request. O(1) per operation. Drop-in for
    the ``deque`` it replaces (``append``, ``popleft``, ``len``, truth, iteration).
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


class LoRAEngine(OfflineMixin):
    def __init__(self, config: EngineConfig, *, transform: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        """``transform`` rewrites the loaded base before LoRA layers wrap it (the merged path
        merges a tenant's adapter into the weights there).

        All torch work -- loading, adapter parsing and copies, every forward -- runs on the
        engine's own thread. Why: each thread that enters an OpenMP region gets its own
        worker team, and once there are more OpenMP threads than cores libgomp stops spinning
        between regions; a decode step of many small GEMMs then ran ~40% slower on 2 cores.
        """
        self.config = config
        self._cv = threading.Condition()
        self._waiting = FairQueue()  # round-robin across tenants (see FairQueue)
        self._running: list[Request] = []  # holding KV blocks, oldest first (decoding or mid-prefill)
        self.preemptions = 0
        self.share_preemptions = 0  # of those, for the row share (``_share_rows``)
        self._tasks: deque[tuple[Callable, tuple, Future]] = deque()  # run on the engine thread
        self._stopped = False
        self._inflight = 0  # submitted and not finished, wherever they are
        self.steps = 0
        ready: Future = Future()
        self._thread = threading.Thread(target=self._main, args=(transform, ready), name="lora-engine", daemon=True)
        self._thread.start()
        ready.result()  # re-raises a loading error here, in the caller

    def _setup(self, transform) -> None:
        config = self.config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        t0 = time.perf_counter()
        model, self.tokenizer, self.device, self.dtype = load_base_model(config)
        if transform is not None:
            model = transform(model)
        self.model = model
        self._ctx = LoRAContext()
        self.base_shape = base_shape(model, config.lora_target_modules)
        wrap_lora_layers(model, config.lora_target_modules, self._ctx)
        self.max_model_len = config.max_model_len or min(model.config.max_position_embeddings, 4096)
        self.runner = self._make_runner()
        # a slot buffer grows to hold the most adapters one step can use, and some spare
        n = config.max_num_seqs
        self.lora = LoRAManager(self.base_shape, dtype=self.dtype, device=self.device, max_slots=n + max(4, n // 4))
        self.vocab_size = model.config.vocab_size
        self.eos_ids = self._eos_ids()
        self.output = OutputProcessor(self.tokenizer, max_model_len=self.max_model_len, grammars=self.grammars,
                                      score_prompt=self.score_prompt, finish=self._finish)
        logger.info(
            "engine ready in %.1fs: %s on %s (%s%s), max_model_len=%d",
            time.perf_counter() - t0, config.model, self.device, self.dtype,
            "" if config.quantization == "none" else f", {config.quantization}", self.max_model_len,
        )

    def _main(self, transform, ready: Future) -> None:
        try:
            self._setup(transform)
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(None)
        self._loop()

    def run_in_engine(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the engine thread between steps and return its result."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        return self._queue_task(fn, args).result()

    async def run_in_engine_async(self, fn: Callable, *args):
        """``run_in_engine`` from async code: awaits the engine thread without holding a worker
        of the default executor (which adapter fetches and registry reads use) while it waits."""
        return await asyncio.wrap_future(self._queue_task(fn, args))

    def _queue_task(self, fn: Callable, args: tuple) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._stopped:
                raise EngineError("engine is shut down")
            self._tasks.append((fn, args, fut))
            self._cv.notify()
        return fut

    def _make_runner(self) -> ModelRunner:
        cfg = self.config
        per_token = ModelRunner.bytes_per_token(self.model, self.dtype)
        budget = cfg.kv_cache_memory_bytes
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * cfg.kv_cache_memory_fraction)
        elif budget is None:  # CPU: what the dense cache this replaced held at its usual size
            budget = per_token * max(cfg.max_num_seqs * min(512, self.max_model_len), self.max_model_len)
        num_blocks = budget // (per_token * cfg.block_size)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory_bytes {budget} holds no block of {cfg.block_size} tokens "
                f"({per_token * cfg.block_size} bytes for this model); raise kv_cache_memory_bytes"
            )
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens, %.1f MiB (%d bytes per token); prefix caching %s",
            num_blocks, cfg.block_size, num_blocks * cfg.block_size, num_blocks * cfg.block_size * per_token / 2**20,
            per_token, "on" if cfg.enable_prefix_caching else "off",
        )
        return ModelRunner(self.model, num_blocks=num_blocks, block_size=cfg.block_size,
                           max_model_len=self.max_model_len, ctx=self._ctx, prefix_caching=cfg.enable_prefix_caching)

    def _eos_ids(self) -> frozenset[int]:
        ids = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(value)
        return frozenset(ids)

    # ---- adapters (the engine API's names, engine/api.py; offline.py loads from a folder) ------

    def add_adapter(self, weights: LoRAWeights) -> ResidentAdapter:
        """Copy parsed, validated weights into the pool (on the engine thread: run_in_engine)."""
        return self.lora.add(weights)

    def pin_adapter(self, adapter: str | ResidentAdapter) -> ResidentAdapter:
        """Pin a version for one request (its rows stay until ``unpin_adapter``)."""
        return self.lora.acquire(adapter)

    def unpin_adapter(self, adapter: ResidentAdapter) -> None:
        self.lora.release(adapter)

    def remove_adapter(self, adapter: str | ResidentAdapter) -> None:
        """Retire a version; its memory is reused once the requests using it finish. Its
        prefix-cache counts go too (the stats and their metric labels do not grow per version)."""
        self.lora.remove(adapter)
        if self.runner is not None:
            with self._cv:  # the scheduler adds to them under this lock
                self.runner.blocks.prefix.forget(adapter if isinstance(adapter, str) else adapter.adapter_id)

    def resident_adapters(self) -> list[str]:
        """The adapter IDs with a current version in the pool."""
        return self.lora.resident_ids()

    # ---- requests --------------------------------------------------------------------------

    def _out_of_vocab(self, ids) -> list:
        """The items of ``ids`` that are not token IDs of this model (bool is not an int here)."""
        return [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            bad = self._out_of_vocab(ids)
            if bad:
                raise InvalidRequestError(
                    f"prompt token id {bad[0]!r} is out of range; ids must be integers in [0, {self.vocab_size})"
                )
        if not ids:
            raise InvalidRequestError("prompt is empty; send at least one token")
        return ids

    def grammars(self) -> GrammarCache:
        """The engine's compiled structured-output grammars (built on first use, on the caller's
        thread: compiling never runs in the engine's step)."""
        cache = getattr(self, "_grammar_cache", None)
        if cache is None:
            with _GRAMMAR_INIT:  # not the engine's lock: building it takes 20-130 ms, once
                cache = getattr(self, "_grammar_cache", None)
                if cache is None:
                    cfg = self.config
                    cache = self._grammar_cache = GrammarCache(
                        self.tokenizer, self.vocab_size, self.eos_ids,
                        compile_timeout_s=cfg.structured_output_compile_timeout_s,
                        compile_memory_bytes=cfg.structured_output_compile_memory_bytes,
                        compile_workers=cfg.structured_output_compile_workers)
        return cache

    def warm_grammars(self) -> None:
        """Build the grammar cache and start its compile workers in the background (a replica
        calls this at start): the first response_format then does not wait 2-8 s for a worker
        process, and one tenant's slow compile does not make another's first schema wait for a
        second worker to start. Costs ~270 MB per worker process."""
        threading.Thread(target=lambda: self.grammars().warm(), name="grammar-warm", daemon=True).start()

    async def compile_grammar(self, schema: str, tenant: str | None = None) -> None:
        """Compile a response_format schema before submit, off the event loop and off the default
        executor (adapter loading's): on the grammar cache's own threads, tried first in a sandbox
        process under the compile time and memory limits, one cache miss at a time per ``tenant``
        (engine/structured.py); ``submit`` then finds it. A schema over a limit or refused by the
        compiler raises InvalidRequestError here (and is remembered: a repeat costs nothing)."""
        cache = getattr(self, "_grammar_cache", None)
        if cache is None:  # built once (the tokenizer's tables: 20-130 ms) on a thread of its own
            built: Future = Future()

            def build() -> None:
                try:
                    built.set_result(self.grammars())
                except BaseException as e:
                    built.set_exception(e)

            threading.Thread(target=build, name="grammar-init", daemon=True).start()
            cache = await asyncio.wrap_future(built)
        await cache.compile(schema, tenant)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: str | ResidentAdapter | None,
        sink: Callable[[RequestOutput], None] | tuple[asyncio.AbstractEventLoop, asyncio.Queue],
        request_id: str | None = None,
        tenant: str | None = None,
        cache_salt: str | None = None,
    ) -> Request:
        """Queue one request. ``tenant``: its fair-admission key and, unless ``cache_salt`` is
        given, the salt of its prefix-cache entries (see ``_cache_key``)."""
        prompt_ids = self.tokenize(prompt)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) is more than "
                f"max_model_len {self.max_model_len}; shorten the prompt or lower max_tokens"
            )
        pool = self.runner.blocks if self.runner is not None else None  # None: generate() keeps its own cache
        if pool is not None and pool.blocks_for(len(prompt_ids) + params.max_tokens) > pool.num_blocks:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) needs more KV memory than "
                f"this replica has ({pool.num_blocks} blocks of {pool.block_size} tokens = "
                f"{pool.num_blocks * pool.block_size} tokens); shorten the prompt or lower max_tokens"
            )
        bad = self._out_of_vocab(params.logit_bias)
        if bad:
            raise InvalidRequestError(
                f"logit_bias token id {bad[0]!r} is out of range; ids must be integers in [0, {self.vocab_size})"
            )
        grammar = self.grammars().row(params.json_schema) if params.json_schema is not None else None
        resident = self.lora.acquire(adapter) if adapter is not None else None
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        req = Request(
            request_id=request_id or f"req-{next(_ids)}",
            prompt_ids=prompt_ids,
            params=params,
            adapter=resident,
            sink=sink,
            assembler=TextAssembler(self.tokenizer, prompt_ids, params.stop),
            stop_ids=stop_ids,
            generator=generator,
            tenant=tenant,
            cache_key=self._cache_key(resident, tenant if cache_salt is None else cache_salt),
            grammar=grammar,
            prompt_lp=[self.output.first_prompt_logprob(prompt_ids)] if params.echo and params.logprobs is not None else None,
        )
        with self._cv:
            if self._stopped:
                if resident is not None:
                    self.lora.release(resident)
                raise EngineError("engine is shut down")
            self._waiting.append(req)
            self._inflight += 1
            self._cv.notify()
        return req

    @staticmethod
    def _cache_key(resident: ResidentAdapter | None, salt: str | None) -> tuple:
        """The prefix-cache key of a request's blocks: its adapter's version and load (None for
        the base), salted with its tenant. Without the salt, the 1.5 ms vs 41 ms first token of a
        hit tells a tenant whether ANOTHER tenant sent a given prompt prefix to the same model
        (the base is shared by every tenant, an adapter by every key that may use it). Requests
        share cached blocks only under equal salts: one tenant's own requests, or keys the
        operator gave one salt (vLLM's ``cache_salt``). ``salt`` None: no salt (the offline API)."""
        return (None if resident is None else (resident.adapter_id, resident.load_id), salt)

    def abort(self, req: Request) -> None:
        """Stop a request (client went away). Its adapter pin is dropped at the next step."""
        with self._cv:
            req.aborted = True
            self._cv.notify()

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: str | ResidentAdapter | None = None,
        request_id: str | None = None,
        *,
        tenant: str | None = None,
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Start a request from async code; iterate the returned stream for its outputs.

        Raises at once (before any await) for invalid input or an adapter that is gone, so a
        caller can retry with a fresh adapter handle.
        """
        stream = RequestStream(self.abort)
        stream.req = self.add_request(
            prompt, params, adapter, (asyncio.get_running_loop(), stream.queue), request_id, tenant=tenant,
            cache_salt=cache_salt,
        )
        return stream

    def stats(self) -> dict:
        with self._cv:
            prefilling = sum(1 for r in self._running if r.length - r.num_computed > 1)
            return {
                "running": len(self._running) - prefilling,
                "prefilling": prefilling,
                "waiting": len(self._waiting),
                "waiting_tenants": self._waiting.tenants(),
                "steps": self.steps,
                "generated_tokens": self.output.generated_tokens,
                "lora": self.lora.stats(),
                **({} if self.runner is None else {"kv": {
                    **self.runner.blocks.stats(), "preemptions": self.preemptions,
                    "share_preemptions": self.share_preemptions,
                    "decode_reads": dict(self.runner.decode_paths)}}),
            }

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until no request is waiting or running (before unloading a whole engine)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cv:
                if self._inflight == 0:
                    return True
            time.sleep(0.02)
        return False

    def shutdown(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ---- the loop (engine thread only below) ---------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and not self._waiting and not self._running and not self._tasks:
                    self._cv.wait()
                if self._stopped:
                    break
                tasks = list(self._tasks)
                self._tasks.clear()
            for fn, args, fut in tasks:
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:
                    fut.set_exception(e)
            with self._cv:
                sched = self._schedule()
            try:
                self._step(sched)
            except Exception as e:  # a bug or OOM must fail these requests, not kill the loop
                logger.exception("engine step failed; failing %d requests", len(self._running))
                # The client gets a generic message; the details are in the log above.
                err = e if isinstance(e, ServeAppError) else EngineError("engine step failed; see the replica log")
                for req in list(self._running):
                    if not req.finished:
                        self._finish(req, None, error=err)
                self._running = []
            self.output.flush()
        # Shutting down: nothing more will run.
        for _, _, fut in self._tasks:
            fut.set_exception(EngineError("engine shut down"))
        for req in [*self._running, *self._waiting]:
            if not req.finished:
                self._finish(req, None, error=EngineError("engine shut down"))
        self.output.flush()

    def _schedule(self) -> list[tuple[Request, int]]:
        """This step's work, ``(request, tokens to compute)``, decode rows first (under the lock).

        The per-step token budget (``max_num_batched_tokens``): one token for each decoding
        row, then more of each prompt being prefilled in chunks, then waiting prompts (fair
        order), whole while they fit and the first one that does not in chunks. A long prompt is
        spread over steps while every running row keeps getting a token per step, so one
        tenant's long prompt never stalls the others. A row that needs a block when the pool is
        empty takes one from the newest running row not yet scheduled (preemption); when there
        is none, it is preempted itself.
        """
        cfg = self.config
        pool = self.runner.blocks
        for req in self._running:
            if req.aborted and not req.finished:
                self._finish(req, "abort")
        self._running = [r for r in self._running if not r.finished]
        if self._waiting and len(self._running) >= cfg.max_num_seqs:
            self._share_rows()
        budget = cfg.max_num_batched_tokens
        sched: dict[Request, int] = {}
        decoding = [r for r in self._running if r.length - r.num_computed == 1]
        prefilling = [r for r in self._running if r.length - r.num_computed > 1]
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
        free_rows = len(self._running) < cfg.max_num_seqs
        tenants = {FairQueue.key(r) for r in prefilling} | (set(self._waiting.keys()) if free_rows else set())
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
        watermark = max(1, pool.num_blocks // 100)  # left free for the running rows' next blocks
        full: set[str | None] = {k for k, u in used.items() if u >= share}  # tenants at their share this step
        while self._waiting and len(self._running) < cfg.max_num_seqs and budget > 0:
            req = self._waiting.peek(skip=full)
            if req is None:
                break
            if req.aborted:
                self._finish(self._waiting.remove(req), "abort")
                continue
            key = FairQueue.key(req)
            limit = req.length - 1  # at least one token is computed: its logits are the next token's
            if req.scores_prompt:  # its prompt's logprobs come from computing every position
                limit = 0
            hits, nodes = pool.lookup(req.cache_key, req.tokens(0, limit), limit)
            computed = len(hits) * pool.block_size
            remaining = req.length - computed
            room = share - used.get(key, 0)
            take, cost = self._chunk(computed, remaining, min(budget, room), self._weight(req))
            need = pool.blocks_for(computed + take) - len(hits)
            if need > pool.num_free - (watermark if self._running else 0):
                pool.free(hits)
                break
            if take < remaining and take < _MIN_CHUNK:
                pool.free(hits)
                if room >= budget:  # the step's budget, not this tenant's share, is what ran out
                    break
                full.add(key)  # no room for this tenant this step; others may fit
                continue
            self._waiting.remove(req)
            pool.prefix.add(req.adapter and req.adapter.adapter_id, limit // pool.block_size * pool.block_size, computed)
            req.blocks = hits + [pool.allocate() for _ in range(need)]
            req.nodes, req.num_computed, req.status = nodes, computed, RequestStatus.RUNNING
            self._running.append(req)
            sched[req] = take
            costs[req] = cost
            used[key] = used.get(key, 0) + cost
            budget -= cost
            if used[key] >= share:
                full.add(key)
        for req in [r for r in self._running if r.status is RequestStatus.RUNNING and r.length - r.num_computed > 1]:  # the rest
            if budget <= 0:
                break
            if sched.get(req, 0) < req.length - req.num_computed:
                prefill(req, budget + costs.get(req, 0))
        return list(sched.items())

    def _chunk(self, start: int, remaining: int, budget: int, weight: float = 1.0) -> tuple[int, int]:
        """How many of a sequence's ``remaining`` tokens from position ``start`` fit in ``budget``,
        and what they cost: a token costs ``weight`` (1: its projections and MLP; more when its
        logits are computed too), plus its attention over the context before it in those units
        (``attn_ctx_ref``). A chunk deep into a long prompt attends to everything before it, so it
        takes fewer tokens and the step stays as short as one early in the prompt: the running
        rows' inter-token gap stays bounded all the way."""
        if remaining == 1:  # a decode row (or a prompt's last token): its attention reads, it is not a chunk
            return (1, 1) if budget >= 1 else (0, 0)
        ref = self.runner.attn_ctx_ref

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
        return 1.0 + self.runner.logits_cost if req.scores_prompt else 1.0

    def _share_rows(self) -> None:
        """Every row is taken and a tenant waits: if it holds less than its share of the rows
        (``max_num_seqs`` over the tenants with work, at least 1) while another holds more,
        preempt that tenant's newest row and admit the waiting tenant next. One tenant's 64 long
        requests then no longer hold every row until one of them ends. At most one row a step;
        the preempted request waits at the head of its own tenant's queue (its cached prefix
        blocks make the re-run cheap)."""
        held: dict[str | None, int] = {}
        for r in self._running:
            k = FairQueue.key(r)
            held[k] = held.get(k, 0) + 1
        waiting = self._waiting.keys()
        share = max(1, self.config.max_num_seqs // len(set(held) | set(waiting)))
        top = max(held, key=held.get)
        if held[top] <= share:
            return
        starved = next((k for k in waiting if held.get(k, 0) < share and k != top), None)
        if starved is None:
            return
        victim = next(r for r in reversed(self._running) if FairQueue.key(r) == top)
        self._preempt(victim, jump=False)
        self._waiting.promote(starved)
        self.share_preemptions += 1

    def _grow(self, req: Request, take: int, sched: dict) -> bool:
        """Give ``req`` the blocks for ``take`` more tokens, preempting newer unscheduled rows."""
        pool = self.runner.blocks
        need = pool.blocks_for(req.num_computed + take) - len(req.blocks)
        while need > 0:
            block = pool.allocate()
            if block is None:
                victim = next((r for r in reversed(self._running) if r is not req and r not in sched), None)
                if victim is None:
                    return False
                self._preempt(victim)
                continue
            req.blocks.append(block)
            need -= 1
        return True

    def _preempt(self, req: Request, *, jump: bool = True) -> None:
        """Free a running row's blocks; it waits first in line and is recomputed when readmitted."""
        self.runner.blocks.free(req.blocks)
        req.blocks, req.nodes, req.num_computed, req.status = [], [], 0, RequestStatus.WAITING
        self._running.remove(req)
        self._waiting.appendleft(req, jump=jump)
        self.preemptions += 1
        req.preemptions += 1
        logger.debug("preempted %s (%d tokens so far) for lack of KV blocks", req.request_id, req.length)

    def _step(self, sched: list[tuple[Request, int]]) -> None:
        num_decode = next((i for i, (r, take) in enumerate(sched) if r.length - r.num_computed != 1), len(sched))
        if sched:
            try:
                self._forward(sched, num_decode)
            except Exception as e:
                if num_decode == len(sched):
                    raise  # a decode-only step: nothing to tell apart, the loop fails it
                # A prompt (or a chunk) broke the step: run the parts apart, so only the request
                # that breaks its own forward fails; the KV written meanwhile is the same.
                logger.warning("engine step with prompts failed (%r); running its parts separately", e)
                if num_decode:
                    self._forward(sched[:num_decode], num_decode)
                for item in sched[num_decode:]:
                    try:
                        self._forward([item], 0)
                    except Exception as e1:
                        self.output.fail(item[0], e1, "prefill")
        self.steps += 1

    def _forward(self, sched: list[tuple[Request, int]], num_decode: int) -> None:
        """One forward over ``sched`` (decode rows first), then the tokens it produced.

        A row whose logits come out non-finite (its adapter overflowed on this input) fails
        here, naming its adapter, and its blocks are freed without entering the prefix cache:
        non-finite KV is never found by a later request. Padding reads the null block only
        (model.py), so such a row cannot touch another row of the step.
        """
        rows, per_token = [], []
        for r, take in sched:
            start = r.num_computed
            every = r.scores_prompt and start < len(r.prompt_ids) - 1
            rows.append(SeqChunk(r.tokens(start, start + take), start, r.blocks, every_token=every))
            per_token += [r.adapter] * take
        lora = self.lora.prepare(per_token)
        out = self.runner.step(rows, num_decode, lora)  # [len(sched) + the every-token rows' extra, vocab]
        logits, finite = self.output.row_logits(sched, rows, out)
        ready, at = [], []
        for j, (r, take) in enumerate(sched):
            r.num_computed += take
            if not finite[j]:
                self.output.fail(r, self.output.overflow_error(r), "forward")
                continue
            self._register_blocks(r)
            if r.num_computed == r.length:  # a whole sequence is in: its last logits give a token
                ready.append(r)
                at.append(j)
        if ready:
            if len(ready) < len(sched):
                logits = logits[torch.tensor(at, device=logits.device)]
            self.output.append_tokens(ready, logits, lora)

    def _register_blocks(self, req: Request) -> None:
        """Index the blocks ``req`` just filled in the prefix cache."""
        pool = self.runner.blocks
        if not pool.prefix_caching:
            return
        bs = pool.block_size
        while len(req.nodes) < req.num_computed // bs:
            i = len(req.nodes)
            parent = req.nodes[-1] if req.nodes else ROOT
            req.nodes.append(pool.register(parent, req.cache_key, tuple(req.tokens(i * bs, (i + 1) * bs)), req.blocks[i]))

    @torch.inference_mode()
    def score_prompt(self, ids: list[int], adapter: ResidentAdapter | None) -> torch.Tensor:
        """Raw logits [T, vocab] at every position of ``ids`` under ``adapter`` (engine thread)."""
        if self.runner is None:  # GenerateEngine: the (merged) model as it is
            return self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
        lora = self.lora.prepare([adapter] * len(ids)) if adapter is not None else None
        return self.runner.score(ids, lora)

    def _finish(self, req: Request, reason: str | None, delta: str = "", new_ids: list[int] | None = None,
                error: ServeAppError | None = None, logprobs: list | None = None) -> RequestOutput | None:
        """End a request: its blocks and adapter pin go back, its last output is queued. None if
        it had already ended."""
        if req.finished:
            return None
        req.status = RequestStatus.FINISHED
        with self._cv:
            self._inflight -= 1
        if req.blocks:
            self.runner.blocks.free(req.blocks)
            req.blocks = []
        if req.adapter is not None:
            self.lora.release(req.adapter)
            req.adapter = None
        return self.output.final(req, reason, delta, new_ids, error, logprobs)
