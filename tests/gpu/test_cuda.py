"""GPU-only paths: bf16 and NF4 on CUDA against plain PEFT. Skipped where CUDA is absent."""

import pytest
import torch

from serve_app.config import EngineConfig
from serve_app.demo import build_demo_assets
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.sampling import SamplingParams
from tests.helpers import TINY

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("gpu-demo"), **TINY)


@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_cuda_engine_runs_every_adapter(assets, quantization):
    eng = LoRAEngine(EngineConfig(model=str(assets.base), device="cuda", dtype="bfloat16",
                                  quantization=quantization, max_lora_rank=32))
    try:
        for aid in assets.adapter_ids:
            eng.load_adapter(aid, str(assets.adapters_dir / aid))
        outs = eng.generate_batch([([1, 20, 30, 40], GREEDY, a) for a in [None, *assets.adapter_ids]])
        assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
        assert len({tuple(o.token_ids) for o in outs}) > 1
    finally:
        eng.shutdown()


def test_cuda_fp32_matches_peft(assets):
    from tests.helpers import peft_model, reference_greedy

    eng = LoRAEngine(EngineConfig(model=str(assets.base), device="cuda", dtype="float32", max_lora_rank=32))
    try:
        aid = assets.adapter_ids[1]
        eng.load_adapter(aid, str(assets.adapters_dir / aid))
        ours = eng.generate_batch([([1, 20, 30, 40], GREEDY, aid)])[0].token_ids
        ref = reference_greedy(peft_model(assets.base, assets.adapters_dir / aid), [1, 20, 30, 40], GREEDY.max_tokens)
        assert ours == ref
    finally:
        eng.shutdown()
