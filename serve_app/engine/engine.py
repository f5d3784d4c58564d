"""The engine: one base model, many adapters, one iteration-level batching loop.

A background thread owns the model. Each iteration schedules one step within a token budget
(``max_num_batched_tokens``): one token for every decoding sequence first, whatever adapter
each uses, then the rest of prompts being prefilled in chunks, then new prompts; all of it is
one forward. A request joins at the next iteration and leaves the moment it finishes. Outputs
go back per step: to asyncio queues (one wake-up per event loop per step, not per token) or to
plain callbacks.

One step is three beats, three objects (nano-vllm's ``LLMEngine.step``, vLLM v1's core):
``scheduler.schedule()`` (scheduler.py: fair admission round-robin across tenants, the budget
and chunking, preemption; it owns the KV cache manager of kv_cache.py) -> ``runner.step()``
(model_runner.py: the KV tensors and the forward) -> ``output.append_tokens()``
(output_processor.py: sampling, logprobs, echo, stop and length, the outbox). This file keeps
the thread and its task queue, setup, request intake (``submit``/``abort``), the adapter API
(api.py), grammars and stats; the offline API (``generate_batch``, ``load_adapter``) is
offline.py's mixin.

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
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

import torch

from serve_app.engine.config import EngineConfig
from serve_app.engine.detokenizer import TextAssembler
from serve_app.engine.lora.manager import LoRAManager, ResidentAdapter
from serve_app.engine.lora.weights import LoRAWeights
from serve_app.engine.kv_cache import KVCacheManager, cache_key
from serve_app.engine.arch import base_shape
from serve_app.engine.loader import eos_ids, load_base_model
from serve_app.engine.model_runner import ModelRunner, SeqChunk
from serve_app.engine.lora.layers import LoRAContext, wrap_lora_layers
from serve_app.api.wire import RequestOutput
from serve_app.engine.offline import OfflineMixin
from serve_app.engine.output_processor import OutputProcessor
from serve_app.engine.request import EngineError, Request, RequestStream
from serve_app.engine.sampling import SamplingParams
from serve_app.engine.scheduler import Scheduler, SchedulerOutput
from serve_app.engine.structured import GrammarCache
from serve_app.errors import InvalidRequestError, ServeAppError

logger = logging.getLogger(__name__)

_ids = itertools.count()
_GRAMMAR_INIT = threading.Lock()  # LoRAEngine.grammars(): one GrammarCache per engine


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
        self.scheduler = self._make_scheduler()
        # a slot buffer grows to hold the most adapters one step can use, and some spare
        n = config.max_num_seqs
        self.lora = LoRAManager(self.base_shape, dtype=self.dtype, device=self.device, max_slots=n + max(4, n // 4))
        self.vocab_size = model.config.vocab_size
        self.eos_ids = eos_ids(model, self.tokenizer)
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
        """The forward over a KV pool sized from the memory budget (``ModelRunner.kv_blocks``)."""
        num_blocks = ModelRunner.kv_blocks(self.model, self.dtype, self.device, self.config, self.max_model_len)
        return ModelRunner(self.model, num_blocks=num_blocks, block_size=self.config.block_size,
                           max_model_len=self.max_model_len, ctx=self._ctx)

    def _make_scheduler(self) -> Scheduler:
        """The scheduler over the runner's pool, charging chunks in the runner's cost units."""
        cfg, runner = self.config, self.runner
        kv = KVCacheManager(runner.num_blocks, cfg.block_size, prefix_caching=cfg.enable_prefix_caching)
        return Scheduler(cfg, kv, attn_ctx_ref=runner.attn_ctx_ref, logits_cost=runner.logits_cost)

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
        with self._cv:  # the scheduler adds to them under this lock
            self.scheduler.forget_adapter(adapter if isinstance(adapter, str) else adapter.adapter_id)

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

    def add_request(self, prompt: str | list[int], params: SamplingParams, adapter: str | ResidentAdapter | None,
                    sink: Callable[[RequestOutput], None] | tuple[asyncio.AbstractEventLoop, asyncio.Queue],
                    request_id: str | None = None, tenant: str | None = None, cache_salt: str | None = None) -> Request:
        """Queue one request. ``tenant``: its fair-admission key and, unless ``cache_salt`` is
        given, the salt of its prefix-cache entries (see ``kv_cache.cache_key``)."""
        prompt_ids = self.tokenize(prompt)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) is more than "
                f"max_model_len {self.max_model_len}; shorten the prompt or lower max_tokens"
            )
        self.scheduler.check_fits(len(prompt_ids), params.max_tokens)
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
            request_id=request_id or f"req-{next(_ids)}", prompt_ids=prompt_ids, params=params, adapter=resident,
            sink=sink, assembler=TextAssembler(self.tokenizer, prompt_ids, params.stop), stop_ids=stop_ids,
            generator=generator, tenant=tenant, grammar=grammar,
            cache_key=cache_key(resident, tenant if cache_salt is None else cache_salt),
            prompt_lp=[self.output.first_prompt_logprob(prompt_ids)] if params.echo and params.logprobs is not None else None,
        )
        with self._cv:
            if self._stopped:
                if resident is not None:
                    self.lora.release(resident)
                raise EngineError("engine is shut down")
            self.scheduler.add(req)
            self._inflight += 1
            self._cv.notify()
        return req

    def abort(self, req: Request) -> None:
        """Stop a request (client went away). Its adapter pin is dropped at the next step."""
        with self._cv:
            req.aborted = True
            self._cv.notify()

    def submit(self, prompt: str | list[int], params: SamplingParams, adapter: str | ResidentAdapter | None = None,
               request_id: str | None = None, *, tenant: str | None = None, cache_salt: str | None = None) -> RequestStream:
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

    @torch.inference_mode()
    def score_prompt(self, ids: list[int], adapter: ResidentAdapter | None) -> torch.Tensor:
        """Raw logits [T, vocab] at every position of ``ids`` under ``adapter`` (engine thread)."""
        lora = self.lora.prepare([adapter] * len(ids)) if adapter is not None else None
        return self.runner.score(ids, lora)

    def stats(self) -> dict:
        with self._cv:
            out = {**self.scheduler.stats(), "steps": self.steps, "generated_tokens": self.output.generated_tokens,
                   "lora": self.lora.stats()}
            kv = self.scheduler.kv_stats()
            if kv is not None:
                out["kv"] = {**kv, "decode_reads": dict(self.runner.decode_paths)}
            return out

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
                while not self._stopped and not self.scheduler.has_work() and not self._tasks:
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
            self.step()
        # Shutting down: nothing more will run.
        for _, _, fut in self._tasks:
            fut.set_exception(EngineError("engine shut down"))
        for req in [*self.scheduler.running, *self.scheduler.waiting]:
            if not req.finished:
                self._finish(req, None, error=EngineError("engine shut down"))
        self.output.flush()

    def step(self) -> None:
        """One iteration: schedule -> run (forward and outputs) -> deliver."""
        with self._cv:
            sched = self.scheduler.schedule()
        for req in sched.aborted:  # the scheduler let them go: their blocks are back
            self._close(req, "abort")
        try:
            self._run(sched)
        except Exception as e:  # a bug or OOM must fail these requests, not kill the loop
            running = self.scheduler.take_running()
            logger.exception("engine step failed; failing %d requests", len(running))
            # The client gets a generic message; the details are in the log above.
            err = e if isinstance(e, ServeAppError) else EngineError("engine step failed; see the replica log")
            for req in running:
                if not req.finished:
                    self._finish(req, None, error=err)
        self.output.flush()

    def _run(self, sched: SchedulerOutput) -> None:
        """The step's forward(s) and their outputs (static_batch.py runs a batch its own way)."""
        rows, num_decode = sched.rows, sched.num_decode
        self.runner.zero_blocks(sched.new_blocks)
        if rows:
            try:
                self._forward(rows, num_decode)
            except Exception as e:
                if num_decode == len(rows):
                    raise  # a decode-only step: nothing to tell apart, the loop fails it
                # A prompt (or a chunk) broke the step: run the parts apart, so only the request
                # that breaks its own forward fails; the KV written meanwhile is the same.
                logger.warning("engine step with prompts failed (%r); running its parts separately", e)
                if num_decode:
                    self._forward(rows[:num_decode], num_decode)
                for item in rows[num_decode:]:
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
        (model_runner.py), so such a row cannot touch another row of the step.
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
            self.scheduler.computed(r, take, cache=finite[j])
            if not finite[j]:
                self.output.fail(r, self.output.overflow_error(r), "forward")
            elif r.num_computed == r.length:  # a whole sequence is in: its last logits give a token
                ready.append(r)
                at.append(j)
        if ready:
            if len(ready) < len(sched):
                logits = logits[torch.tensor(at, device=logits.device)]
            self.output.append_tokens(ready, logits, lora)

    def _finish(self, req: Request, reason: str | None, delta: str = "", new_ids: list[int] | None = None,
                error: ServeAppError | None = None, logprobs: list | None = None) -> RequestOutput | None:
        """End a request: its blocks go back, then ``_close``. None if it had already ended."""
        if req.finished:
            return None
        self.scheduler.finish(req)
        return self._close(req, reason, delta, new_ids, error, logprobs)

    def _close(self, req: Request, reason: str | None, delta: str = "", new_ids: list[int] | None = None,
               error: ServeAppError | None = None, logprobs: list | None = None) -> RequestOutput:
        """A request the scheduler has let go: its adapter pin is dropped and its last output queued."""
        with self._cv:
            self._inflight -= 1
        if req.adapter is not None:
            self.lora.release(req.adapter)
            req.adapter = None
        return self.output.final(req, reason, delta, new_ids, error, logprobs)
