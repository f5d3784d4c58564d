"""The architectures the engine serves: ``config.architectures`` name -> ArchSpec.

The loader (loader.py) refuses any other architecture before it reads a weight: our decoder
loop calls a family's submodules itself, so a model whose forward does something this registry
does not know would load and produce wrong text. To add a family, write a file here with its
ArchSpec (base.py says what one holds; llama.py is the example) and add one line to
``_FAMILIES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serve_app.engine.arch import llama
from serve_app.engine.arch.base import ArchSpec, BaseShape

if TYPE_CHECKING:
    from torch import nn

_FAMILIES: tuple[ArchSpec, ...] = (
    llama.LLAMA, llama.MISTRAL, llama.QWEN2, llama.QWEN3,
)

REGISTRY: dict[str, ArchSpec] = {name: spec for spec in _FAMILIES for name in spec.names}

# Every projection kind some served architecture lets LoRA target, in first-seen order
# (engine/config.py's LORA_TARGET_KINDS).
LORA_KINDS: tuple[str, ...] = tuple(dict.fromkeys(k for spec in _FAMILIES for k in spec.lora_kinds))

__all__ = ["ArchSpec", "BaseShape", "LORA_KINDS", "REGISTRY", "UnsupportedArchitectureError", "base_shape",
           "get_arch", "spec_for", "supported"]


class UnsupportedArchitectureError(ValueError):
    """A model whose architecture the engine does not know: refused at load, never served."""


def supported() -> list[str]:
    return sorted(REGISTRY)


def get_arch(name: str) -> ArchSpec:
    spec = REGISTRY.get(name)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"model architecture {name!r} is not supported by this engine (supported: {', '.join(supported())}); "
            "to add one, write its ArchSpec in a file under serve_app/engine/arch/ (see arch/llama.py) and "
            "register it in serve_app/engine/arch/__init__.py"
        )
    return spec


def spec_for_names(names: list[str] | tuple[str, ...] | None, fallback: str) -> ArchSpec:
    """The spec of the first registered name in ``names`` (a config's ``architectures``), or of
    ``fallback`` (the loaded class's name) when the config lists none."""
    for name in names or ():
        if name in REGISTRY:
            return REGISTRY[name]
    return get_arch(names[0] if names else fallback)


def spec_for(model: nn.Module) -> ArchSpec:
    """The spec of a loaded model (its config's ``architectures``, else its class name)."""
    return spec_for_names(getattr(model.config, "architectures", None), type(model).__name__)


def base_shape(model: nn.Module, kinds: tuple[str, ...]) -> BaseShape:
    """What an adapter must fit on ``model``: (in, out) features of each targeted projection."""
    return spec_for(model).base_shape(model, kinds)
