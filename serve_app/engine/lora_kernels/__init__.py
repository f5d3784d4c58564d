"""Mixed-adapter LoRA products whose cost is per row, not per batch.

- ``layout``: the per-step token layout (segments of tokens that use one adapter) and the
  adapter-major stacked weights every per-row path reads.
- ``sgmv_cpu``: the CPU paths (a GEMM pair per contiguous run, or one padded batched GEMM
  pair over the adapter-sorted tokens).
- ``sgmv_triton``: shrink/expand Triton kernels with SGMV semantics, used on CUDA.
- ``cost``: the per-step choice between those and the masked dense product.
"""

from serve_app.engine.lora_kernels.layout import PATHS, SegmentLayout, StackedGroup, build_layout

__all__ = ["PATHS", "SegmentLayout", "StackedGroup", "build_layout"]
