"""What a LoRA kernel path is: one object per path, called by every LoRALinear.

A step's mixed-adapter delta on a projection is two products: ``shrink`` (``h = x @ A``, once
per input group and layer: q/k/v share it) and ``expand`` (``out += h @ B``, per projection),
each token using only its own adapter's weights (vLLM's punica wrapper: ``add_shrink`` /
``add_expand``, one implementation per platform). A path also says which weights it reads:
``stacked`` ones (adapter-major, lora/slots.py) with a per-step token ``layout`` (layout.py), or
the masked product's gathered columns. The cost model (cost.py) chooses the path per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from serve_app.engine.lora.kernels.layout import SegmentLayout


class LoRAKernel:
    """One LoRA path. ``g`` below is the step's ``GroupBatch`` for the projection's input group
    (lora/layers.py): the weights (``g.a_layers``, ``g.stack``), the mask or the layout."""

    name: str = ""
    # Reads adapter-major stacks laid out per token (True), or the masked product's gathered
    # columns (False). A stacked path's batch prepared per row is expanded per token.
    stacked: bool = True

    def shrink(self, x2: torch.Tensor, g: Any, layer: int) -> Any:
        """x2 [N, in] @ A for layer ``layer``: the path's own form of h (see its docstring)."""
        raise NotImplementedError

    def expand(self, out2: torch.Tensor, h: Any, g: Any, kind: str, start: int, end: int, b_l: torch.Tensor) -> None:
        """out2 [N, out] += each token's h[.., start:end] @ its adapter's B (``b_l``), in place."""
        raise NotImplementedError

    def layout(self, tok_adapter: list[int], member_of: list[int], n_members: int,
               device: torch.device) -> SegmentLayout | None:
        """The step's token layout this path reads, for one input group (stacked paths)."""
        return None

    def __repr__(self) -> str:
        return f"<LoRA kernel {self.name}>"
