"""The PEFT folder rules, written once: which files an adapter is, and what is refused.

The store's listing check (store.check_adapter_files, before anything is downloaded) and the
engine's parse (engine/lora_weights.py, on the local copy) apply the same rules with the same
messages. Pure Python, no torch: the engine imports it, it imports nothing of the engine.
"""

from __future__ import annotations

from serve_app.errors import InvalidAdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # the only files ever downloaded or copied
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes: the LoRA settings


def pickle_refused(adapter_id: str) -> InvalidAdapterError:
    return InvalidAdapterError(
        f"adapter '{adapter_id}': {PICKLE_NAME} is a pickle file and is refused (it can run code when "
        f"loaded); re-save the adapter with safe_serialization=True to get {WEIGHTS_NAME}"
    )


def weights_too_large(adapter_id: str, size: int, max_bytes: int) -> InvalidAdapterError:
    return InvalidAdapterError(
        f"adapter '{adapter_id}': weights are {size} bytes, more than max_adapter_bytes {max_bytes}; "
        "raise store.max_adapter_bytes if this adapter is expected to be that large"
    )


def config_too_large(adapter_id: str, size: int) -> InvalidAdapterError:
    return InvalidAdapterError(
        f"adapter '{adapter_id}': {CONFIG_NAME} is {size} bytes, more than the limit "
        f"{MAX_CONFIG_BYTES}; it should hold only the LoRA settings"
    )
