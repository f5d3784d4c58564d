"""The merged path: PEFT merge_and_unload + DeepSpeed init_inference, served by our engines."""

import shutil

import pytest
import torch

from serve_app.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.merge import build_merged_engine
from serve_app.engine.sampling import SamplingParams
from serve_app.engine.static_batch import GenerateEngine
from serve_app.errors import InvalidAdapterError
from tests.helpers import peft_model, reference_greedy

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 40, 41, 42, 43], [1, 7, 99, 300], [1, 250, 251, 252, 253, 254, 255]]


@pytest.mark.parametrize("idx", [1, 2])  # attention+MLP rank 8; q/v-only rank 16
def test_merged_equals_lora_path_equals_peft(tiny_assets, idx):
    aid = tiny_assets.adapter_ids[idx]
    path = str(tiny_assets.adapters_dir / aid)
    cfg = EngineConfig(model=str(tiny_assets.base), max_lora_rank=32)
    merged = build_merged_engine(cfg, aid, path)
    lora = LoRAEngine(cfg)
    try:
        lora.load_adapter(aid, path)
        ref_model = peft_model(tiny_assets.base, path)
        refs = [reference_greedy(ref_model, p, GREEDY.max_tokens) for p in PROMPTS]
        got_merged = [o.token_ids for o in merged.generate_batch([(p, GREEDY, None) for p in PROMPTS])]
        got_lora = [o.token_ids for o in lora.generate_batch([(p, GREEDY, aid) for p in PROMPTS])]
        assert got_merged == refs
        assert got_lora == refs
        assert merged.config.lora_target_modules == ()  # no LoRA layers on the merged copy
    finally:
        merged.shutdown()
        lora.shutdown()


def test_generate_engine_matches_iteration_engine(tiny_assets):
    """The static-batch engine (used behind DeepSpeed kernel injection) picks the same tokens as
    the iteration engine, greedy rows equal plain transformers, and a stop token really stops."""
    cfg = EngineConfig(model=str(tiny_assets.base), lora_target_modules=())
    static, loop = GenerateEngine(cfg), LoRAEngine(cfg)
    try:
        refs = [reference_greedy(peft_model(tiny_assets.base, None), p, GREEDY.max_tokens) for p in PROMPTS]
        # A stop ID the row really generates: its 4th greedy token (first seen there, so it stops there).
        stop_id = refs[1][3]
        cut = refs[1].index(stop_id)
        assert cut >= 1, refs[1]
        sampled = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
        stopped = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id])
        work = [(p, GREEDY, None) for p in PROMPTS] + [(PROMPTS[0], sampled, None), (PROMPTS[1], stopped, None)]
        a, b = static.generate_batch(work), loop.generate_batch(work)
        for name, outs in (("GenerateEngine", a), ("LoRAEngine", b)):
            assert [o.token_ids for o in outs[:3]] == refs, f"{name} greedy rows differ from transformers"
            assert outs[4].finish_reason == "stop" and outs[4].token_ids == refs[1][: cut + 1], (name, outs[4])
            assert [o.finish_reason for o in outs[:4]] == ["length"] * 4, name
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert [o.text for o in a] == [o.text for o in b]
        assert [o.finish_reason for o in a] == [o.finish_reason for o in b]
    finally:
        static.shutdown()
        loop.shutdown()


def _bad_copy(tiny_assets, tmp_path, fn):
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "bad"
    shutil.copytree(tiny_assets.adapters_dir / tiny_assets.adapter_ids[0], dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    save_file(fn(tensors), dst / "adapter_model.safetensors")
    return str(dst)


def test_broken_adapters_are_refused_by_name(tiny_assets, tmp_path):
    cfg = EngineConfig(model=str(tiny_assets.base), max_lora_rank=32)

    def nan(t):
        k = sorted(t)[0]
        t[k] = t[k].clone()
        t[k][0, 0] = float("nan")
        return t

    with pytest.raises(InvalidAdapterError, match="'tenant-x'.*NaN or inf"):
        build_merged_engine(cfg, "tenant-x", _bad_copy(tiny_assets, tmp_path, nan))
    shutil.rmtree(tmp_path / "bad")

    # Finite factors whose product overflows fp32: the gain bound refuses it before PEFT merges
    # (the safe merge's isfinite check stays behind it as a second line).
    huge = lambda t: {k: v * 1e30 for k, v in t.items()}  # noqa: E731
    with pytest.raises(InvalidAdapterError, match="'tenant-y'.*LoRA gain .* exceeds"):
        build_merged_engine(cfg, "tenant-y", _bad_copy(tiny_assets, tmp_path, huge))


def _run_batch(engine, prompts, params, timeout=60.0):
    """Submit ``prompts`` as one batch; each row's outputs, or a failure if any row hangs."""
    import threading

    outs = [[] for _ in prompts]
    finished = threading.Semaphore(0)

    def sink_for(i):
        def sink(out):
            outs[i].append(out)
            if out.finished:
                finished.release()
        return sink

    for i, p in enumerate(prompts):
        engine.add_request(p, params, None, sink_for(i))
    for i in range(len(prompts)):
        assert finished.acquire(timeout=timeout), f"{len(prompts) - i} rows of the batch never finished"
    return outs


@pytest.mark.parametrize("failure", ["mid-batch", "oom"])
def test_failed_static_batch_finishes_every_row_with_an_error(tiny_assets, failure):
    """generate() raising (a fused kernel, out of memory) used to leave the batch's rows open:
    they are not in the loop's _running, so nobody finished them and their callers hung. Every
    row now ends with an error naming the batch, and the engine serves the next batch."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from serve_app.errors import EngineOverloadedError, ServeAppError

    cfg = EngineConfig(model=str(tiny_assets.base), lora_target_modules=())
    static = GenerateEngine(cfg)
    real = static.model.generate

    def broken(**kw):
        static.model.generate = real  # this batch only
        if failure == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        steps = []

        class Boom(LogitsProcessor):  # runs after our token choice: 3 tokens streamed, then a crash
            def __call__(self, input_ids, scores):
                steps.append(1)
                if len(steps) == 3:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
                return scores

        kw["logits_processor"] = LogitsProcessorList([*kw["logits_processor"], Boom()])
        return real(**kw)

    try:
        static.model.generate = broken
        outs = _run_batch(static, PROMPTS, GREEDY)
        for rows in outs:
            last = rows[-1]
            assert last.finished and isinstance(last.error, ServeAppError), rows
            assert f"{len(PROMPTS)} requests, {max(map(len, PROMPTS))} prompt tokens wide" in last.error.message
            assert "retry" in last.error.message
            if failure == "oom":
                assert isinstance(last.error, EngineOverloadedError) and last.error.status_code == 503
            else:
                assert last.error.status_code == 500 and "RuntimeError" in last.error.message
                assert sum(len(o.token_ids) for o in rows) == 3  # what was streamed before the crash
        # The engine thread survived: the next batch is served in full.
        again = _run_batch(static, PROMPTS, GREEDY)
        assert all(rows[-1].error is None and rows[-1].finish_reason == "length" for rows in again)
    finally:
        static.model.generate = real
        static.shutdown()
