"""From a step's logits to each request's output: what a row's token is and what it says.

In order, per step: the prompt logprobs of rows that asked for them, gathered from the chunks
as their prefill passes (``_add_prompt_logprobs``); each row's last logits and the non-finite
check, which fails a row naming its adapter; then for the rows whose whole sequence is in
(``append_tokens``): logits processors -> grammar mask -> sample -> logprobs -> poisoned
adapters -> echo -> grammar accept -> stop IDs -> detokenize + stop strings -> length ->
finish or emit.

Per-row error containment: whatever goes wrong for one row (its processors, its sampling, its
grammar, its detokenizer, its adapter's numerics) fails that request alone, with an error that
names the cause when it is the client's or the adapter's; the other rows of the step go on.

Outputs wait in an outbox until the step ends; ``flush`` then delivers them: to asyncio queues
(one ``call_soon_threadsafe`` per event loop per step, not per token) or to plain callbacks.

The engine gives this class its ``finish`` (a request ends: the scheduler frees its blocks, the
engine drops its adapter pin, then ``final`` makes its last output here) and ``score_prompt``
(echo on the merged engine scores the prompt in a forward of its own). A new per-token output
field is computed here and carried in ``RequestOutput`` (api/wire.py) and ``merge_outputs``
(request.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Callable

import torch

from serve_app.api.wire import RequestOutput, TokenLogprob
from serve_app.engine.lora.layers import LoRABatch
from serve_app.engine.lora.manager import ResidentAdapter
from serve_app.engine.model_runner import SeqChunk
from serve_app.engine.request import EngineError, NonFiniteOutputError, Request
from serve_app.engine.sampling import LogitsRow, apply_logits_processors, sample
from serve_app.engine.structured import GrammarCache, GrammarError
from serve_app.errors import ServeAppError

logger = logging.getLogger(__name__)

# finish(req, reason, delta, new_ids, error=, logprobs=) -> the final output, None if already finished
Finish = Callable[..., "RequestOutput | None"]


class OutputProcessor:
    def __init__(self, tokenizer, *, max_model_len: int, grammars: Callable[[], GrammarCache],
                 score_prompt: Callable[[list[int], ResidentAdapter | None], torch.Tensor], finish: Finish):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.grammars = grammars
        self.score_prompt = score_prompt
        self.finish = finish
        self.generated_tokens = 0
        self._token_texts: dict[int, str] = {}  # token id -> its text alone (logprobs), filled as seen
        self._outbox: list[tuple[Request, RequestOutput]] = []

    # ---- the outbox ---------------------------------------------------------------------------

    def emit(self, req: Request, out: RequestOutput) -> None:
        self._outbox.append((req, out))

    def final(self, req: Request, reason: str | None, delta: str = "", new_ids: list[int] | None = None,
              error: ServeAppError | None = None, logprobs: list | None = None) -> RequestOutput:
        """Queue a finished request's last output (its detokenizer flushed when it ran out)."""
        if reason in ("length", "stop") and not req.assembler.stopped:
            try:
                delta += req.assembler.finish()
            except Exception:  # this request's text only; it still finishes
                logger.exception("detokenizer flush of %s failed", req.request_id)
        out = RequestOutput(
            req.request_id, delta, new_ids or [], finished=True, finish_reason=reason,
            prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids), error=error,
            logprobs=logprobs,
        )
        self.emit(req, out)
        return out

    def flush(self) -> None:
        """Deliver this step's outputs: one call_soon_threadsafe per event loop, not per token."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for req, out in self._outbox:
            if isinstance(req.sink, tuple):
                loop, queue = req.sink
                by_loop.setdefault(loop, []).append((queue, out))
            else:
                try:
                    req.sink(out)
                except Exception:
                    logger.exception("output callback of %s failed", req.request_id)
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    # ---- the step's logits --------------------------------------------------------------------

    def row_logits(self, sched: list[tuple[Request, int]], rows: list[SeqChunk],
                   out: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """Each row's last logits ``[len(sched), vocab]`` and whether they are finite. ``out`` is
        the runner's: rows that asked for every token's logits (a prompt's own logprobs) give
        their prompt logprobs here first."""
        logits = out
        if len(out) != len(sched):  # some rows returned every token: pick each row's last
            ends = list(itertools.accumulate(len(c.tokens) if c.every_token else 1 for c in rows))
            for (r, _), c, end in zip(sched, rows, ends):
                if c.every_token:
                    self._add_prompt_logprobs(r, out[end - len(c.tokens) : end], c.start)
            logits = out[torch.tensor([e - 1 for e in ends], device=out.device)]
        finite = torch.isfinite(logits.amax(dim=-1)).tolist()  # [len(sched)]: max propagates NaN
        return logits, finite

    @staticmethod
    def overflow_error(req: Request) -> ServeAppError:
        who = "the base model" if req.adapter is None else f"adapter '{req.adapter.adapter_id}'"
        return NonFiniteOutputError(
            f"{who} produced non-finite values on this request's input (its weights overflow on it); "
            "the request was stopped. Retrain or rescale the adapter (smaller lora_alpha or weights)"
        )

    def fail(self, req: Request, exc: BaseException, where: str) -> None:
        """Fail one request, whatever the others in its step do."""
        if isinstance(exc, ServeAppError):
            err = exc
        else:
            logger.error("request %s failed in %s", req.request_id, where, exc_info=exc)
            err = EngineError(f"the request failed in the engine ({where}); see the replica log")
        self.finish(req, None, error=err)

    # ---- prompt logprobs (echo) ---------------------------------------------------------------

    def first_prompt_logprob(self, ids: list[int]) -> TokenLogprob:
        return TokenLogprob(self.token_text(ids[0]), ids[0], None, None)  # nothing predicts the first token

    def _add_prompt_logprobs(self, req: Request, logits: torch.Tensor, start: int) -> None:
        """Prompt logprobs from one chunk's logits ``[n, vocab]`` at positions ``start ..``: the
        logits at position t score prompt token t + 1. Only positions not scored yet count (a
        re-run after a preemption computes them again)."""
        ids = req.prompt_ids
        first = len(req.prompt_lp) - 1  # the next position to score
        stop = min(start + len(logits), len(ids) - 1)
        if stop <= first:
            return
        logits = logits[first - start : stop - start].float()  # [m, vocab]
        k = req.params.logprobs
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [m, 1]
        targets = ids[first + 1 : stop + 1]
        chosen = (logits.gather(1, torch.tensor(targets, device=logits.device)[:, None]) - lse)[:, 0].tolist()
        tops: list[list] = [[] for _ in chosen]
        if k:
            top_v, top_i = logits.topk(k, dim=-1)
            tops = [[(self.token_text(t), t, v) for t, v in zip(ti, tv)] for ti, tv in zip(top_i.tolist(), (top_v - lse).tolist())]
        decode = self.token_text
        req.prompt_lp += [TokenLogprob(decode(t), t, lp, top) for t, lp, top in zip(targets, chosen, tops)]

    def _prompt_echo(self, req: Request) -> tuple[str, list[TokenLogprob] | None]:
        """echo: the prompt decoded, and with logprobs each prompt token's raw logprob and top-k
        (the first one None). On the LoRA engine they were collected from the request's own
        prefill chunks (``_add_prompt_logprobs``); the merged engine scores the prompt."""
        ids = req.prompt_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        k = req.params.logprobs
        if k is None:
            return text, None
        if req.prompt_lp is not None and len(req.prompt_lp) == len(ids):
            return text, req.prompt_lp
        decode = self.token_text
        entries = [TokenLogprob(decode(ids[0]), ids[0], None, None)]
        if len(ids) == 1:
            return text, entries
        logits = self.score_prompt(ids, req.adapter)[:-1]  # [T-1, vocab]: position t predicts ids[t + 1]
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        target = torch.tensor(ids[1:], device=logits.device)[:, None]
        chosen = (logits.gather(1, target) - lse)[:, 0].tolist()
        tops = [[] for _ in chosen]
        if k:
            top_v, top_i = logits.topk(k, dim=-1)
            tops = [[(decode(t), t, v) for t, v in zip(ti, tv)]
                    for ti, tv in zip(top_i.tolist(), (top_v - lse).tolist())]
        entries += [TokenLogprob(decode(t), t, lp, top) for t, lp, top in zip(ids[1:], chosen, tops)]
        return text, entries

    # ---- the sampled tokens -------------------------------------------------------------------

    def append_tokens(self, rows: list[Request], logits: torch.Tensor, lora: LoRABatch | None = None) -> None:
        """One token for each of ``rows`` from its logits ``[len(rows), vocab]``, then its output."""
        asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw = None
        if asked:  # raw model logprobs, before penalties and temperature (vLLM's default)
            raw = logits[torch.tensor(asked, device=logits.device)].float()  # [A, vocab], a copy
        # min_tokens does not hold EOS back on a constrained row: its grammar decides where it ends.
        processed = [LogitsRow(i, r.params, r.prompt_ids, r.output_ids, r.stop_ids if r.grammar is None else frozenset())
                     for i, r in enumerate(rows) if r.params.processes_logits]
        failed = apply_logits_processors(logits, processed) if processed else {}
        constrained = [(i, r.grammar, r.output_ids) for i, r in enumerate(rows) if r.grammar is not None]
        if constrained:  # after the processors, so a bias cannot lift a token the grammar forbids
            failed.update(self.grammars().mask_rows(logits, constrained))
        picked, errors = sample(logits, [r.params for r in rows], [r.generator for r in rows])
        errors.update(failed)
        token_lp = self._token_logprobs(asked, raw, rows, picked) if asked else {}
        if lora is not None and lora.poisoned:
            for i, req in enumerate(rows):
                if req.adapter is not None and req.adapter.load_id in lora.poisoned:
                    errors[i] = EngineError(
                        f"adapter '{req.adapter.adapter_id}' was found corrupted in device memory and unloaded; retry"
                    )
        echo = {}  # id(request) -> (prompt text, prompt logprobs): on its first output
        for i, r in enumerate(rows):
            if r.params.echo and not r.output_ids and i not in errors:
                try:
                    echo[id(r)] = self._prompt_echo(r)
                except Exception as e:
                    errors[i] = e

        def with_echo(req: Request, out: RequestOutput | None) -> None:
            if out is not None and id(req) in echo:
                out.prompt_text, out.prompt_logprobs = echo[id(req)]

        self.generated_tokens += len(rows) - len(errors)
        for i, (req, token) in enumerate(zip(rows, picked)):
            if i in errors:
                self.fail(req, errors[i], "sampling")
                continue
            req.output_ids.append(token)
            n_out = len(req.output_ids)
            lp = token_lp.get(i)
            if req.grammar is not None and not req.grammar.accept(token):
                self.fail(req, GrammarError("the sampled token broke the request's response_format; it was stopped"),
                          "sampling")
                continue
            if token in req.stop_ids:
                with_echo(req, self.finish(req, "stop", new_ids=[token], logprobs=lp))
                continue
            try:
                delta, hit_stop = req.assembler.add_token(token)
            except Exception as e:  # detokenizing / stop matching of this request only
                self.fail(req, e, "detokenization")
                continue
            if hit_stop or (req.grammar is not None and req.grammar.terminated):  # (ignore_eos: the grammar ended it)
                with_echo(req, self.finish(req, "stop", delta, [token], logprobs=lp))
            elif n_out >= req.params.max_tokens or len(req.prompt_ids) + n_out >= self.max_model_len:
                with_echo(req, self.finish(req, "length", delta, [token], logprobs=lp))
            else:
                out = RequestOutput(req.request_id, delta, [token], logprobs=lp)
                with_echo(req, out)
                self.emit(req, out)

    def _token_logprobs(self, asked: list[int], raw, rows: list[Request], picked: list[int]) -> dict:
        """Row index -> [TokenLogprob] of its sampled token: its logprob and its top-k alternatives.
        ``raw``: [A, vocab] raw logits of the rows that asked; logprob = logit - logsumexp (no
        [A, vocab] log-softmax is written)."""
        out = {}
        k_max = max(rows[i].params.logprobs for i in asked)
        lse = torch.logsumexp(raw, dim=-1, keepdim=True)  # [A, 1]
        chosen = (raw.gather(1, torch.tensor([[picked[i]] for i in asked], device=raw.device)) - lse)[:, 0].tolist()
        top_v = top_i = None
        if k_max:
            top_v, top_i = raw.topk(k_max, dim=-1)  # [A, k_max]
            top_v, top_i = (top_v - lse).tolist(), top_i.tolist()
        decode = self.token_text
        for j, i in enumerate(asked):
            k = rows[i].params.logprobs
            top = [(decode(t), t, v) for t, v in zip(top_i[j][:k], top_v[j][:k])] if k else []
            out[i] = [TokenLogprob(decode(picked[i]), picked[i], chosen[j], top)]
        return out

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own (logprobs' token strings), cached: it never changes."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
