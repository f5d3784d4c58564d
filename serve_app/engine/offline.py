"""The offline API: what tests, benchmarks and scripts call on an engine (nano-vllm's ``LLM``).

``LoRAEngine`` inherits it. The served path (deployments/) uses the engine API of api.py
instead: ``add_adapter`` with weights the replica parsed, ``pin_adapter``/``unpin_adapter``
around ``submit``, ``remove_adapter``. Here an adapter is loaded from a folder and requests are
run to completion in a batch.
"""

from __future__ import annotations

import threading
from typing import AsyncIterator

import torch

from serve_app.api.wire import RequestOutput
from serve_app.engine.lora.layers import LoRABatch
from serve_app.engine.lora.manager import ResidentAdapter
from serve_app.engine.lora.weights import load_adapter_tensors, parse_adapter_config
from serve_app.engine.model_runner import SeqChunk
from serve_app.engine.request import Completion, merge_outputs
from serve_app.engine.sampling import SamplingParams


class OfflineMixin:
    """Mixed into ``LoRAEngine``: uses its ``config``, ``base_shape``, ``dtype``, ``runner``,
    ``scheduler``, ``run_in_engine``, ``add_adapter``, ``remove_adapter``, ``add_request`` and
    ``submit`` (engine.py; not imported here, which would be a circle)."""

    def load_adapter(self, adapter_id: str, path: str) -> ResidentAdapter:
        """Validate and copy an adapter into device memory; it becomes the ID's current version.

        Config and tensors are parsed and validated on the caller's thread (numpy, no torch
        kernel: lora_weights.py); only the copy into the pool waits for the engine thread.
        """
        spec = parse_adapter_config(adapter_id, path, self.base_shape, max_rank=self.config.max_lora_rank)
        weights = load_adapter_tensors(
            spec, path, self.base_shape,
            max_rank=self.config.max_lora_rank, dtype=self.dtype, max_bytes=self.config.max_adapter_bytes,
        )
        return self.run_in_engine(self.add_adapter, weights)

    def unload_adapter(self, adapter: str | ResidentAdapter) -> None:
        """Retire an adapter (``remove_adapter``): its memory is reused once the requests using it
        finish."""
        self.remove_adapter(adapter)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: str | ResidentAdapter | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs as they are produced."""
        stream = self.submit(prompt, params, adapter, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def generate_batch(
        self, requests: list[tuple[str | list[int], SamplingParams, str | ResidentAdapter | None]]
    ) -> list[Completion]:
        """Submit all requests at once and wait for all of them (tests, benchmarks, scripts)."""
        done = threading.Semaphore(0)
        results: list[list[RequestOutput]] = [[] for _ in requests]

        def sink_for(i):
            def sink(out: RequestOutput):
                results[i].append(out)
                if out.finished or out.error is not None:
                    done.release()
            return sink

        reqs = [self.add_request(p, sp, a, sink_for(i)) for i, (p, sp, a) in enumerate(requests)]
        for _ in requests:
            done.acquire()
        completions = []
        for req, outs in zip(reqs, results):
            if outs and outs[-1].error is not None:
                raise outs[-1].error
            merged = merge_outputs(outs)
            completions.append(
                Completion(
                    request_id=req.request_id,
                    text=merged.text,
                    token_ids=merged.token_ids,
                    finish_reason=merged.finish_reason,
                    prompt_tokens=len(req.prompt_ids),
                    logprobs=merged.logprobs,
                )
            )
        return completions

    def prefill(self, prompts: list[list[int]], lora: LoRABatch | None) -> torch.Tensor:
        """Whole prompts from position 0 in scratch blocks, freed after (tests and benchmarks
        compare logits this way; the served path goes through ``step``): last-token logits
        [B, vocab]. ``lora`` is prepared per token, or per row when every prompt has one length.
        Call it while the engine is idle (on its thread, or with nothing running)."""
        if lora is not None and len({len(p) for p in prompts}) > 1 and lora.rows == len(prompts) and not lora.uniform:
            raise ValueError("a per-row LoRABatch needs prompts of one length; prepare it per token")
        kv = self.scheduler.kv
        pool = kv.pool
        tables: list[list[int]] = []
        try:
            for p in prompts:
                tables.append(table := [])
                for _ in range(pool.blocks_for(len(p))):
                    if (block := pool.allocate()) is None:
                        raise RuntimeError("the KV pool is too small for these prompts")
                    table.append(block)
            self.runner.zero_blocks(kv.take_new_blocks())
            return self.runner.step([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)], 0, lora)
        finally:
            for t in tables:
                pool.free(t)
