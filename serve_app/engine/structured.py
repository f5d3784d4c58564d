"""Structured output on the engine side: compiled grammars, per-request matchers, the row mask.

``response_format`` (json_object / json_schema) and vLLM's ``guided_json`` arrive as one JSON
schema text in ``SamplingParams.json_schema`` (api/structured.py checks it at the edge). Here,
through xgrammar (chosen by measurement over llguidance: benchmarks/grammar_bench.py, its
mask + accept per token is 2.5-4x cheaper on CPU at vocab 8192 and 49152):

* ``GrammarCache``: one per engine. Builds xgrammar's tokenizer info once (lazily, on the first
  constrained request: 20-130 ms) and keeps one compiled grammar per schema text (LRU), so a
  schema compiles once, never in the engine's step: the deployments await
  ``LoRAEngine.compile_grammar`` (a worker thread; xgrammar releases the GIL) before submit, so
  the replica's event loop keeps serving while it compiles, and ``add_request`` finds it cached.
  A schema the compiler refuses is an ``InvalidRequestError`` (a 400) at submit.
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

import threading
from collections import OrderedDict

import torch

from serve_app.errors import InvalidRequestError, ServeAppError

MAX_GRAMMARS = 128  # compiled schemas kept per engine (a compiled grammar is ~KBs to a few MB)
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarError(ServeAppError):
    status_code = 500
    error_type = "internal_error"
    code = "grammar_failed"


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
    """Compiled grammars of one engine's tokenizer, one per schema text (LRU)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int], max_entries: int = MAX_GRAMMARS):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        # One thread: compiles run beside the engine's step on the same cores.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        self.max_entries = max_entries
        self._grammars: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()  # the LRU
        self._compile_lock = threading.Lock()  # one compile at a time (and one per schema)
        self._mask = None  # [rows, words] int32, reused across steps (engine thread only)
        self._json_ok = _json_safe_words(info.decoded_vocab, vocab_size, stop_ids)  # [words] int32
        self.compiles = 0  # schemas compiled (a cache miss each)

    def compiled(self, schema: str):
        with self._lock:
            g = self._grammars.get(schema)
            if g is not None:
                self._grammars.move_to_end(schema)
                return g
        with self._compile_lock:
            with self._lock:
                g = self._grammars.get(schema)  # compiled while this thread waited
            if g is not None:
                return g
            try:
                g = self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
            except Exception as e:  # the client's schema: xgrammar says what it cannot express
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise InvalidRequestError(f"response_format: the JSON schema cannot be used for structured output: "
                                          f"{msg.split(': ', 1)[-1][:300]}") from None
            with self._lock:
                self.compiles += 1
                self._grammars[schema] = g
                while len(self._grammars) > self.max_entries:
                    self._grammars.popitem(last=False)
            return g

    def has(self, schema: str) -> bool:
        """Whether ``schema`` is compiled already (a request with it costs no compile)."""
        with self._lock:
            return schema in self._grammars

    def row(self, schema: str) -> RowGrammar:
        """A fresh matcher for one request (compiling the schema on a cache miss)."""
        return RowGrammar(self._xgr.GrammarMatcher(self.compiled(schema)))

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
