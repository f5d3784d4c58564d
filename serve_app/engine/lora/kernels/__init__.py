"""The LoRA kernel paths: one backend object per path (base.py), chosen per step by cost.py.

- ``masked`` (masked.py): one dense product over every active adapter's columns, a mask per row.
- ``loop`` and ``bmm`` (sgmv_cpu.py): the CPU per-row paths (a GEMM pair per contiguous run, or
  one padded batched GEMM pair over the adapter-sorted tokens).
- ``triton`` (sgmv_triton.py): shrink/expand Triton kernels with SGMV semantics, used on CUDA;
  loaded on first use (it imports triton).
- ``layout.py``: the per-step token layout and the adapter-major stacked weights every per-row
  path reads; ``cost.py``: the per-step choice between the paths.

To add a path: a file here with its ``LoRAKernel`` object and one line in ``_PATHS``.
"""

from __future__ import annotations

import importlib

from serve_app.engine.lora.kernels.base import LoRAKernel

# path -> the module (in this package) whose ``KERNEL`` / named object implements it
_PATHS: dict[str, tuple[str, str]] = {
    "masked": ("masked", "KERNEL"),
    "loop": ("sgmv_cpu", "LOOP"),
    "bmm": ("sgmv_cpu", "BMM"),
    "triton": ("sgmv_triton", "KERNEL"),  # imports triton: only when a step takes this path
}
PATHS: tuple[str, ...] = tuple(_PATHS)
_loaded: dict[str, LoRAKernel] = {}


def kernel(path: str) -> LoRAKernel:
    """The backend object of ``path`` (one of ``PATHS``), imported on first use."""
    k = _loaded.get(path)
    if k is None:
        if path not in _PATHS:
            raise ValueError(f"unknown LoRA path {path!r}; one of {', '.join(PATHS)}")
        module, name = _PATHS[path]
        k = _loaded[path] = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return k


__all__ = ["PATHS", "LoRAKernel", "kernel"]
