"""The engine API the deployments use, written down as a ``typing.Protocol``.

Both engines satisfy it: ``LoRAEngine`` (engine.py: the LoRA replica's, and the merged
replica's on CPU) and ``GenerateEngine`` (static_batch.py: merged copies with injected
kernels). deployments/ call nothing else on an engine, so a test may swap in a fake that
implements these members; the served path always runs a real engine.

Adapters: ``add_adapter`` copies parsed weights into the pool (engine thread only: call it
through ``run_in_engine``); a request ``pin_adapter``s the version it runs with and
``unpin_adapter``s it when done; ``remove_adapter`` retires a version, whose rows are freed
once the last request pinning it finishes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from serve_app.api.sampling_params import SamplingParams
    from serve_app.engine.config import EngineConfig
    from serve_app.engine.request import RequestStream
    from serve_app.engine.arch import BaseShape
    from serve_app.engine.lora.manager import ResidentAdapter
    from serve_app.engine.lora.weights import LoRAWeights


@runtime_checkable
class EngineAPI(Protocol):
    config: "EngineConfig"
    tokenizer: Any  # the base model's tokenizer (chat prompts are rendered with it)
    base_shape: "BaseShape"  # what adapters are validated against
    dtype: "torch.dtype"  # the compute dtype adapters are cast to

    # ---- adapters
    def add_adapter(self, weights: "LoRAWeights") -> "ResidentAdapter": ...
    def pin_adapter(self, adapter: "str | ResidentAdapter") -> "ResidentAdapter": ...
    def unpin_adapter(self, adapter: "ResidentAdapter") -> None: ...
    def remove_adapter(self, adapter: "str | ResidentAdapter") -> None: ...
    def resident_adapters(self) -> list[str]: ...

    # ---- requests
    def submit(self, prompt: str | list[int], params: "SamplingParams", adapter: "str | ResidentAdapter | None" = None,
               request_id: str | None = None, *, tenant: str | None = None,
               cache_salt: str | None = None) -> "RequestStream": ...
    async def compile_grammar(self, schema: str, tenant: str | None = None) -> None: ...  # before submit, off the loop
    def warm_grammars(self) -> None: ...  # start the compile workers in the background

    # ---- the engine thread and its life
    def run_in_engine(self, fn: Callable, *args) -> Any: ...
    async def run_in_engine_async(self, fn: Callable, *args) -> Any: ...
    def stats(self) -> dict: ...
    def is_alive(self) -> bool: ...
    def drain(self, timeout: float = 60.0) -> bool: ...
    def shutdown(self) -> None: ...
