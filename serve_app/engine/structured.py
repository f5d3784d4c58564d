"""Structured output on the engine side: compiled grammars, per-request matchers, the row mask.

``response_format`` (json_object / json_schema) and vLLM's ``guided_json`` arrive as one JSON
schema text in ``SamplingParams.json_schema`` (api/structured.py checks it at the edge, bounds
included). Here, through xgrammar (chosen by measurement over llguidance:
benchmarks/grammar_bench.py, its mask + accept per token is 2.5-4x cheaper on CPU at vocab 8192
and 49152):

* ``GrammarCache``: one per engine. Keeps one compiled grammar per schema text (LRU), so a
  schema compiles once, never in the engine's step: the deployments await
  ``LoRAEngine.compile_grammar`` before submit, and ``add_request`` finds it. A schema is a
  tenant's input and its compile time is not bounded by its size (a 49-character nested
  bounded repetition: 19 s at vocab 16k, uncancellable in a thread), so a new schema is first
  tried in a sandbox process (engine/grammar_worker.py) under ``structured_output_compile_timeout_s``
  (CPU seconds) and ``structured_output_compile_memory_bytes``; one over a limit, or one xgrammar
  refuses, is an ``InvalidRequestError`` (a 400) and is remembered as refused (a repeat costs
  nothing); one starved of CPU by a busy replica is a 503 to retry, not remembered. One
  that passed is compiled again here (the compiled grammar cannot cross processes cheaply; see
  grammar_worker.py), in about the time it took there: a new normal schema costs 10-35 ms more
  than a compile in this process would (measured, a 5-property schema: 14 ms against 4 ms at
  vocab 16k, 43 against 9 ms at 49k, 2 cores under load). Compiles run on the cache's own threads
  (``structured_output_compile_workers``, each with its warm worker process), never on the
  default executor that adapter loading uses; a schema being compiled is compiled once for all
  who ask; and a tenant has at most one cache miss compiling at a time: its next distinct new
  schema waits for it (holding no thread and no process, only the tenant's own concurrency),
  so a tenant's slow schemas delay that tenant only, and with two or more workers another
  tenant always finds one free.
* ``RowGrammar``: a request's matcher and how many of its output tokens it has consumed. It
  lives on the ``Request`` (nothing in the KV cache or the slots): a request that is preempted
  and recomputed keeps its ``output_ids``, and ``sync`` replays them into a reset matcher
  whenever the count disagrees, so the constraint survives any re-run.
* ``mask_rows``: one packed int32 bitmask row per constrained request (xgrammar fills it in
  place), turned into ``-inf`` on only those rows of the step's logits. Free rows are not
  touched: constrained and free rows share one forward and one sampler call.

Generated JSON has no free whitespace (``any_whitespace=False``: ", " and ": " separators, as
``json.dumps``): a model unsure of what comes next could otherwise emit whitespace until
max_tokens (vLLM's ``disable_any_whitespace``).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from serve_app.engine.grammar_worker import SandboxWorker, WorkerUnavailable, wall_limit
from serve_app.errors import InvalidRequestError, ServeAppError

MAX_GRAMMARS = 128  # compiled schemas kept per engine (a compiled grammar is ~KBs to a few MB)
MAX_GRAMMAR_BYTES = 512 << 20  # and at most this much of them (xgrammar's memory_size_bytes)
MAX_REFUSED = 4096  # refused schemas remembered (by SHA-256: 32 bytes + the message each)
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarError(ServeAppError):
    status_code = 500
    error_type = "internal_error"
    code = "grammar_failed"


class GrammarUnavailableError(ServeAppError):
    """The schema compile sandbox could not be started, stopped answering, or was starved of CPU
    by a busy replica: not the schema's fault, so a 503 to retry (never remembered)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "grammar_compiler_unavailable"


# The grammar a task's ``compile_grammar`` produced, for its own ``submit`` right after: found
# there even if other tenants' compiles evicted it from the LRU in between (an adapter load may
# sit between the two), so add_request never compiles on the event loop.
_HANDOFF: contextvars.ContextVar[tuple[str, object] | None] = contextvars.ContextVar("grammar_handoff", default=None)


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> None:
    """Set ``logits[rows[j], t] = -inf`` wherever bit ``t`` of ``mask[j]`` is 0 (plain torch: any
    device, any dtype).

    ``logits`` [B, V]; ``rows`` [R] long; ``mask`` [R, ceil(V/32)] int32, bit t % 32 of word
    t // 32 set = token t allowed (xgrammar's and llguidance's layout).
    """
    vocab = logits.shape[-1]
    allowed = ((mask.unsqueeze(-1) >> _SHIFTS.to(mask.device)) & 1).view(mask.shape[0], -1)[:, :vocab].bool()
    rows = rows.to(logits.device)
    sel = logits.index_select(0, rows)
    sel.masked_fill_(~allowed.to(logits.device), float("-inf"))
    logits[rows] = sel


def _json_safe_words(decoded_vocab: list[bytes], vocab_size: int, stop_ids) -> torch.Tensor:
    """The packed bitmask [ceil(V/32)] int32 of tokens that hold no byte below 0x20, plus the stop
    tokens. JSON forbids raw control characters in strings and, without free whitespace, needs none
    between tokens; xgrammar 0.2's length-bounded strings (maxLength) let them through (their
    character class excludes only the quote, backslash, CR and LF), which made ``json.loads`` (and
    the openai client's ``parse``) refuse the output, so every constrained row's mask is ANDed with this one."""
    ok = torch.zeros(bitmask_words(vocab_size) * 32, dtype=torch.bool)
    for t, b in enumerate(decoded_vocab[:vocab_size]):
        ok[t] = not any(c < 0x20 for c in b)
    for t in stop_ids:
        if 0 <= t < vocab_size:
            ok[t] = True
    words = (ok.view(-1, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class RowGrammar:
    """One request's grammar state: the matcher and the output tokens it has consumed."""

    __slots__ = ("matcher", "consumed")

    def __init__(self, matcher):
        self.matcher = matcher
        self.consumed = 0

    def sync(self, output_ids: list[int]) -> None:
        """Make the matcher stand after exactly ``output_ids`` (replayed from the start if it
        consumed a different number: a re-run request)."""
        if self.consumed == len(output_ids):
            return
        self.matcher.reset()
        self.consumed = 0
        for t in output_ids:
            if not self.matcher.accept_token(t):
                raise GrammarError("the request's output no longer matches its response_format; it was stopped")
            self.consumed += 1

    def accept(self, token: int) -> bool:
        ok = self.matcher.accept_token(token)
        if ok:
            self.consumed += 1
        return ok

    @property
    def terminated(self) -> bool:
        """The document is complete and its end (a stop token) was accepted."""
        return self.matcher.is_terminated()


class GrammarCache:
    """Compiled grammars of one engine's tokenizer, one per schema text (LRU), compiled through
    the sandbox (module docstring)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int], max_entries: int = MAX_GRAMMARS, *,
                 compile_timeout_s: float = 2.0, compile_memory_bytes: int = 1 << 30, compile_workers: int = 2,
                 max_bytes: int = MAX_GRAMMAR_BYTES):
        import xgrammar as xgr

        self._xgr = xgr
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                        stop_token_ids=sorted(stop_ids))
        self._info_json: str | None = None  # sent to each worker once (built on the first start)
        self.vocab_size = vocab_size
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.timeout_s = compile_timeout_s
        self.memory_bytes = compile_memory_bytes
        self._grammars: OrderedDict[str, object] = OrderedDict()
        self._bytes = 0
        self._refused: OrderedDict[bytes, ServeAppError] = OrderedDict()  # SHA-256 of the schema -> its 400
        self._inflight: dict[str, Future] = {}  # schema -> its compile (everyone asking joins it)
        self._tenant_busy: dict[str | None, Future] = {}  # tenant -> its cache miss compiling
        self._sizes: dict[str, int] = {}  # schema -> its grammar's memory_size_bytes
        self._lock = threading.RLock()  # all of the above (re-entrant: a done callback may run at once)
        # Not the default executor (asyncio.to_thread), which adapter fetch and parse use: a wait
        # for a compile never takes one of its workers. One warm sandbox worker per thread.
        self._executor = ThreadPoolExecutor(max_workers=compile_workers, thread_name_prefix="grammar-compile")
        self._threads = compile_workers
        self._local = threading.local()
        self._workers: list[SandboxWorker] = []
        self._finalizer = weakref.finalize(self, _close, self._executor, self._workers)
        self._mask = None  # [rows, words] int32, reused across steps (engine thread only)
        self._json_ok = _json_safe_words(self._info.decoded_vocab, vocab_size, stop_ids)  # [words] int32
        self.compiles = 0  # schemas compiled (a cache miss each)
        self.refusals = 0  # schemas refused (a limit or the compiler), each once

    # ---- lookups -----------------------------------------------------------------------------

    def has(self, schema: str) -> bool:
        """Whether ``schema`` is compiled already (a request with it costs no compile)."""
        with self._lock:
            return schema in self._grammars

    def refused(self, schema: str) -> ServeAppError | None:
        """The 400 a schema got, if it was refused before (a repeat costs no compile)."""
        with self._lock:
            return self._refused.get(_digest(schema))

    def _lookup(self, schema: str):
        """The compiled grammar, None on a miss; raises the remembered refusal. Under the lock."""
        g = self._grammars.get(schema)
        if g is not None:
            self._grammars.move_to_end(schema)
            return g
        err = self._refused.get(_digest(schema))
        if err is not None:
            raise type(err)(err.message, code=err.code)
        return None

    # ---- compiling ---------------------------------------------------------------------------

    def compiled(self, schema: str):
        """The compiled grammar of ``schema``, compiling it on a miss (this thread waits)."""
        with self._lock:
            g = self._lookup(schema)
            if g is not None:
                return g
            fut = self._inflight.get(schema) or self._start(schema, None, tenant_slot=False)
        return fut.result()

    async def compile(self, schema: str, tenant: str | None = None):
        """The compiled grammar of ``schema`` without holding the event loop: a hit returns at once;
        a miss joins the compile of the same schema if one runs, else starts one once ``tenant``
        has no other miss compiling (it waits for that one first). Raises InvalidRequestError when
        the schema is refused (by a limit or by the compiler). The grammar is also handed to this
        task's ``row`` (its submit), which so never compiles even if the LRU dropped it meanwhile."""
        while True:
            with self._lock:
                g = self._lookup(schema)
                if g is None:
                    fut = self._inflight.get(schema)
                    busy = self._tenant_busy.get(tenant)
                    if fut is None and (busy is None or busy.done()):
                        fut, busy = self._start(schema, tenant, tenant_slot=True), None
            if g is not None:
                break
            if fut is not None:
                # shield: a client that goes away does not cancel the compile others joined.
                g = await asyncio.shield(asyncio.wrap_future(fut))
                break
            try:  # the tenant's previous miss first; its outcome is its own request's
                await asyncio.shield(asyncio.wrap_future(busy))
            except Exception:
                pass
        _HANDOFF.set((schema, g))
        return g

    def _start(self, schema: str, tenant: str | None, *, tenant_slot: bool) -> Future:
        """Submit the compile of ``schema`` (under the lock) and register it in flight."""
        fut = self._executor.submit(self._compile, schema)
        self._inflight[schema] = fut
        if tenant_slot:
            self._tenant_busy[tenant] = fut

        def done(f: Future) -> None:
            with self._lock:
                if self._inflight.get(schema) is f:
                    del self._inflight[schema]
                if tenant_slot and self._tenant_busy.get(tenant) is f:
                    del self._tenant_busy[tenant]

        fut.add_done_callback(done)  # first: it has run before any awaiting caller wakes
        return fut

    def _compile(self, schema: str):
        """On a compile thread: try ``schema`` in the sandbox, then compile it here."""
        verdict, detail = self._probe(schema)
        if verdict == "W":  # starved by a busy box, not stopped by its schema: not the client's fault
            raise GrammarUnavailableError(
                f"response_format could not be compiled now: this replica is too busy (the compile got {detail} s "
                f"of CPU in {wall_limit(self.timeout_s):g} s); retry shortly")
        if verdict != "K":
            err = self._refusal(verdict, detail)
            if verdict != "D":  # a crash may be the box's (an OOM kill): not remembered
                with self._lock:
                    self._refused[_digest(schema)] = err
                    self.refusals += 1
                    while len(self._refused) > MAX_REFUSED:
                        self._refused.popitem(last=False)
            raise err
        compiler = getattr(self._local, "compiler", None)
        if compiler is None:  # one per thread: compiles on different threads share nothing
            compiler = self._local.compiler = self._xgr.GrammarCompiler(self._info, max_threads=1, cache_enabled=False)
        try:
            g = compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        except Exception as e:  # the sandbox's compile passed; the same compile here cannot differ
            raise self._refusal("E", str(e)) from None
        size = g.memory_size_bytes
        with self._lock:
            self.compiles += 1
            self._bytes -= self._sizes.pop(schema, 0)  # compiled again after an eviction
            self._grammars[schema] = g
            self._sizes[schema] = size
            self._bytes += size
            while len(self._grammars) > 1 and (len(self._grammars) > self.max_entries or self._bytes > self.max_bytes):
                old, _ = self._grammars.popitem(last=False)
                self._bytes -= self._sizes.pop(old)
        return g

    def warm(self) -> list[Future]:
        """Start every compile thread's worker process now (~2-4 s each, in parallel) instead of at
        the first new schema; a replica may call it at start. Futures of the starts."""
        n = self._threads
        barrier = threading.Barrier(n)

        def start() -> None:
            self._worker()
            try:  # hold this thread until all have started, so each start lands on its own thread
                barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass

        return [self._executor.submit(start) for _ in range(n)]

    def _worker(self) -> SandboxWorker:
        """This compile thread's warm worker (started on first use, or again after it died)."""
        worker = getattr(self._local, "worker", None)
        if worker is None or not worker.alive():
            if self._info_json is None:
                self._info_json = self._info.serialize_json()
            worker = self._local.worker = SandboxWorker(self._info_json)
            with self._lock:
                self._workers[:] = [w for w in self._workers if w.alive()] + [worker]
        return worker

    def _probe(self, schema: str) -> tuple[str, str]:
        """This thread's worker's verdict on ``schema`` (a worker that died is replaced once)."""
        for attempt in (0, 1):
            try:
                return self._worker().probe(schema, self.timeout_s, self.memory_bytes, wall_limit(self.timeout_s))
            except WorkerUnavailable as e:
                self._local.worker = None
                if attempt == 1:
                    raise GrammarUnavailableError(f"response_format could not be compiled now ({e}); retry shortly") from None
        raise AssertionError("unreachable")

    def _refusal(self, verdict: str, detail: str) -> InvalidRequestError:
        if verdict == "T":
            return InvalidRequestError(
                f"response_format took longer than {self.timeout_s:g} s (CPU time) to compile (limit "
                "structured_output_compile_timeout_s); simplify the schema: fewer or smaller nested "
                "repetitions in patterns, fewer properties or alternatives", code="schema_too_complex")
        if verdict == "M":
            return InvalidRequestError(
                f"response_format needs more than {self.memory_bytes / 2**20:g} MiB to compile (limit "
                "structured_output_compile_memory_bytes); simplify the schema: fewer or smaller nested "
                "repetitions in patterns, fewer properties or alternatives", code="schema_too_complex")
        if verdict == "D":
            return InvalidRequestError(
                f"response_format made the schema compiler fail ({detail[:100]}; memory limit "
                f"{self.memory_bytes / 2**20:g} MiB, structured_output_compile_memory_bytes); simplify the schema",
                code="schema_too_complex")
        # xgrammar's own refusal: its last line, without the C++ source location.
        text = detail.strip()
        msg = text.splitlines()[-1] if text else "the compiler refused it"
        return InvalidRequestError(f"response_format: the JSON schema cannot be used for structured output: "
                                   f"{msg.split(': ', 1)[-1][:300]}")

    def row(self, schema: str) -> RowGrammar:
        """A fresh matcher for one request (compiling the schema on a cache miss)."""
        handed = _HANDOFF.get()
        g = handed[1] if handed is not None and handed[0] == schema else self.compiled(schema)
        return RowGrammar(self._xgr.GrammarMatcher(g))

    def close(self) -> None:
        """Stop the compile threads and their worker processes."""
        self._finalizer()

    @torch.inference_mode()  # the step's logits are inference tensors: written in place only under it
    def mask_rows(self, logits: torch.Tensor, rows: list[tuple[int, RowGrammar, list[int]]]) -> dict[int, ServeAppError]:
        """Mask each constrained row of ``logits`` [B, V] to the tokens its grammar allows next.
        ``rows``: (row index, its grammar, its output_ids so far). Returns the rows that failed
        (row index -> error), each alone; the others are masked."""
        errors: dict[int, ServeAppError] = {}
        B = logits.shape[0]
        if self._mask is None or self._mask.shape[0] < B:
            self._mask = self._xgr.allocate_token_bitmask(max(B, 16), self.vocab_size)
        mask = self._mask
        idx = []
        for i, g, out in rows:
            try:
                g.sync(out)
                g.matcher.fill_next_token_bitmask(mask, i)
                idx.append(i)
            except ServeAppError as e:
                errors[i] = e
            except Exception as e:
                errors[i] = GrammarError(f"structured output failed for this request ({type(e).__name__}); "
                                         "the request was stopped")
        if idx:
            sel = torch.tensor(idx)
            mask[sel] &= self._json_ok  # no raw control characters (see _json_safe_words)
            if logits.is_cpu and logits.dtype == torch.float32 and logits.shape[-1] <= 32 * mask.shape[1]:
                self._xgr.apply_token_bitmask_inplace(logits, mask[:B], vocab_size=logits.shape[-1], indices=idx)
            else:
                apply_bitmask(logits, sel, mask[sel])
        return errors


def _digest(schema: str) -> bytes:
    return hashlib.sha256(schema.encode()).digest()


def _close(executor: ThreadPoolExecutor, workers: list[SandboxWorker]) -> None:
    executor.shutdown(wait=False, cancel_futures=True)
    for w in list(workers):
        w.close()
