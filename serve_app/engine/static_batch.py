"""Static batches through ``model.generate``, for models our decoder loop cannot drive.

DeepSpeed's kernel injection replaces each decoder layer with a fused module that keeps its own
KV cache, so the paged cache (kv_cache.py, model_runner.py) does not apply. This engine admits a
batch, runs it to completion with ``generate`` and streams every step. A logits processor makes
the choice of each token ours (same sampler, seeds, stop strings, EOS and max_tokens rules as
the iteration-level engine), so the output is the same; only the batching is coarser.

The pieces are the iteration engine's, two of them swapped: ``StaticBatchScheduler`` admits
whole prompts, a batch at a time, and holds no KV blocks (``generate()`` keeps its own cache);
``GenerateEngine._run`` runs the batch through ``generate`` instead of the paged runner. The
output processor is the same object, called once per generated step.

A batch's rows live only in ``_run`` (never in the scheduler's ``running``), so when ``generate``
raises (out of memory, a fused kernel, our processor) this engine must finish every row itself,
with an error naming the batch: the loop's own handler would not see them, and their callers
would wait forever.
"""

from __future__ import annotations

import logging

import torch

from serve_app.engine.engine import LoRAEngine
from serve_app.engine.request import EngineError, Request, RequestStatus
from serve_app.engine.scheduler import Scheduler, SchedulerOutput
from serve_app.errors import EngineOverloadedError, ServeAppError

logger = logging.getLogger(__name__)


class StaticBatchScheduler(Scheduler):
    """Whole prompts, up to ``max_num_seqs`` a batch, in the waiting queue's order; no chunks, no
    KV blocks, no preemption (``generate()`` keeps its own cache)."""

    def __init__(self, config):
        super().__init__(config, kv=None)

    def schedule(self) -> SchedulerOutput:
        admitted, aborted = [], []
        while self.waiting and len(admitted) + len(aborted) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            if req.aborted:
                self.finish(req)
                aborted.append(req)
            else:
                req.status = RequestStatus.RUNNING
                admitted.append(req)
        return SchedulerOutput(rows=[(r, len(r.prompt_ids)) for r in admitted], aborted=aborted)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        pass  # no KV pool of ours to outgrow: max_model_len is the only limit

    def finish(self, req: Request) -> None:
        req.status = RequestStatus.FINISHED

    def forget_adapter(self, adapter: str) -> None:
        pass

    def kv_stats(self) -> None:
        return None


class GenerateEngine(LoRAEngine):
    def _make_runner(self):
        return None  # generate() keeps its own cache

    def _make_scheduler(self) -> Scheduler:
        return StaticBatchScheduler(self.config)

    def _run(self, sched: SchedulerOutput) -> None:
        rows = [r for r, _ in sched.rows]
        if not rows:
            return
        try:
            self._generate(rows)
        except Exception as e:
            open_rows = [r for r in rows if not r.finished]
            logger.exception("static batch of %d rows failed; failing the %d still open", len(rows), len(open_rows))
            err = self._batch_error(e, rows)
            for r in open_rows:
                self._finish(r, None, error=err)
        finally:
            self.steps += 1

    @torch.inference_mode()
    def score_prompt(self, ids: list[int], adapter=None) -> torch.Tensor:
        """Raw logits [T, vocab] at every position of ``ids``: the (merged) model as it is."""
        return self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()

    @torch.inference_mode()
    def _generate(self, rows: list[Request]) -> None:
        from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token is at the end
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        engine = self

        class ChooseTokens(LogitsProcessor):
            def __call__(self, input_ids, scores):  # scores: [B, vocab]
                if any(r.aborted and not r.finished for r in rows):
                    for r in rows:
                        if r.aborted and not r.finished:
                            engine._finish(r, "abort")
                live = [i for i, r in enumerate(rows) if not r.finished]
                if live:
                    engine.output.append_tokens([rows[i] for i in live], scores[live])
                    engine.output.flush()
                forced = torch.full_like(scores, float("-inf"))
                for i, r in enumerate(rows):
                    forced[i, r.output_ids[-1] if r.output_ids else pad] = 0.0
                return forced

        class AllDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), all(r.finished for r in rows), dtype=torch.bool)

        gen_config = GenerationConfig(
            max_new_tokens=max(r.params.max_tokens for r in rows) + 1, do_sample=False, pad_token_id=pad
        )
        self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=gen_config,
            logits_processor=LogitsProcessorList([ChooseTokens()]),
            stopping_criteria=[AllDone()],
        )
        for r in rows:  # generate() ended (its own length cap): nothing may stay open
            if not r.finished:
                self._finish(r, "length")

    @staticmethod
    def _batch_error(e: Exception, rows: list[Request]) -> ServeAppError:
        """What each open row of a failed batch is told: the batch's shape and what to do."""
        if isinstance(e, ServeAppError):
            return e
        shape = (f"{len(rows)} requests, {max(len(r.prompt_ids) for r in rows)} prompt tokens wide, "
                 f"up to {max(r.params.max_tokens for r in rows)} new tokens")
        if isinstance(e, torch.OutOfMemoryError):
            return EngineOverloadedError(
                f"the merged replica ran out of memory on a batch of {shape}; retry shortly, "
                "or send a shorter prompt or a smaller max_tokens"
            )
        return EngineError(
            f"the merged replica's batch ({shape}) failed in generate ({type(e).__name__}); "
            "retry the request; the replica log has the cause"
        )
