"""The merged path's model: one tenant's adapter folded into the base weights.

PEFT's ``merge_and_unload(safe_merge=True)`` does the merge and refuses non-finite results;
our own validation (``load_lora_weights``, with the same store settings as the LoRA path:
``max_adapter_bytes``, ``base_model_mismatch``, ``base_model_aliases``) runs first, before PEFT
reads anything, so the merged path refuses exactly what the LoRA path refuses (pickle weights,
wrong shapes, NaN/inf, overflow after scaling, unsafe rank/alpha patterns -- PEFT itself would
run a tenant's pattern keys as regexes) with the same messages. Then DeepSpeed's
``init_inference``: with CUDA it injects its fused inference kernels; on CPU DeepSpeed has no
inference kernels, so the merged model is served as is and the log says why, once.
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence

import torch
from torch import nn

from serve_app.engine.arch import base_shape
from serve_app.engine.config import LORA_TARGET_KINDS
from serve_app.engine.loader import resolve_device_dtype
from serve_app.engine.lora.weights import load_lora_weights
from serve_app.errors import InvalidAdapterError

logger = logging.getLogger(__name__)
_warned_cpu = False


def merge_adapter(
    model: nn.Module,
    adapter_id: str,
    path: str,
    *,
    max_rank: int,
    max_bytes: int = 1 << 30,
    base_mismatch: Literal["ignore", "warn", "refuse"] = "warn",
    base_aliases: Sequence[str] = (),
) -> nn.Module:
    """Return ``model`` with the adapter at ``path`` merged in (a plain transformers model).

    ``max_bytes``, ``base_mismatch``, ``base_aliases``: the LoRA path's validation settings
    (``store.*``), so both paths accept and refuse the same adapters."""
    from peft import PeftModel

    # Validate with the LoRA path's checks before PEFT reads anything.
    dtype = next(model.parameters()).dtype
    load_lora_weights(
        adapter_id, path, base_shape(model, LORA_TARGET_KINDS), max_rank=max_rank, dtype=dtype,
        max_bytes=max_bytes, base_mismatch=base_mismatch, base_aliases=tuple(base_aliases),
    )
    peft_model = PeftModel.from_pretrained(model, path, adapter_name="tenant")
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # PEFT: "NaNs detected in the merged weights..."
        raise InvalidAdapterError(f"adapter '{adapter_id}': merging it into the base gives non-finite weights ({e})") from None
    merged.eval()
    return merged


def deepspeed_optimize(model: nn.Module, dtype: torch.dtype, *, kernel_inject: bool) -> tuple[nn.Module, bool]:
    """Wrap with ``deepspeed.init_inference``; returns (module, kernels_injected)."""
    global _warned_cpu
    try:
        import deepspeed
    except ImportError:
        logger.warning("deepspeed is not installed: serving the merged model without it")
        return model, False
    inject = kernel_inject and torch.cuda.is_available()
    if kernel_inject and not inject and not _warned_cpu:
        _warned_cpu = True
        logger.warning(
            "DeepSpeed has no inference kernels on CPU: the merged model is served through "
            "init_inference without kernel injection (kernels are injected on CUDA machines)"
        )
    engine = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=inject)
    return engine.module, inject


def build_merged_engine(
    config,
    adapter_id: str,
    path: str,
    *,
    kernel_inject: bool = True,
    max_bytes: int | None = None,
    base_mismatch: Literal["ignore", "warn", "refuse"] = "warn",
    base_aliases: Sequence[str] = (),
):
    """An engine serving one tenant from merged weights; no LoRA layers, no adapter pool.

    ``adapter_id`` names the adapter in messages (the merged deployment passes ``<id>@v<n>``);
    ``max_bytes`` (default: the engine's ``max_adapter_bytes``), ``base_mismatch`` and
    ``base_aliases`` are the validation settings, as for the LoRA path.

    An NF4/int8 base is loaded unquantized for the merge (merging into 4-bit weights would
    round the adapter away): the merged copy costs full-precision memory, e.g. ~13.5 GB for a
    7B model in bf16 against ~3.9 GB in NF4.
    """
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.static_batch import GenerateEngine

    cfg = config.model_copy(update={"lora_target_modules": (), "quantization": "none"})
    device, dtype = resolve_device_dtype(cfg)
    inject = kernel_inject and device.type == "cuda"

    def transform(model: nn.Module) -> nn.Module:
        merged = merge_adapter(
            model, adapter_id, path, max_rank=config.max_lora_rank,
            max_bytes=config.max_adapter_bytes if max_bytes is None else max_bytes,
            base_mismatch=base_mismatch, base_aliases=base_aliases,
        )
        module, _ = deepspeed_optimize(merged, dtype, kernel_inject=kernel_inject)
        return module

    # Injected kernels keep their own KV cache: drive them through generate().
    return (GenerateEngine if inject else LoRAEngine)(cfg, transform=transform)
