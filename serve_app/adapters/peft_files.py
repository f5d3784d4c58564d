"""The PEFT folder rules, written once: which files an adapter is, and what is refused.

The store's listing check (store.check_adapter_files, before anything is downloaded) and the
engine's parse (engine/lora/weights.py, on the local copy) apply the same rules with the same
messages. Pure Python, no torch: the engine imports it, it imports nothing of the engine.
"""

from __future__ import annotations

from serve_app.errors import InvalidAdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # the only files ever downloaded or copied
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes: the LoRA settings


class MissingAdapterFileError(InvalidAdapterError):
    """A file of the adapter was not in the folder being parsed (or vanished while it was read).

    For a folder handed to the parse directly, that is the adapter's fault: a 422 like any other
    refusal. For ``AdapterLoader``, whose fetch saw both files listed, it means the local copy
    vanished between the fetch and the parse (the node's disk cache evicted it, a hand-placed
    folder was replaced): a cache miss, fetched again, never remembered as a refusal."""


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


def missing_file(adapter_id: str, name: str) -> MissingAdapterFileError:
    if name == CONFIG_NAME:
        return MissingAdapterFileError(
            f"adapter '{adapter_id}': {CONFIG_NAME} is missing in the adapter folder; save the adapter with "
            "PEFT's save_pretrained")
    return MissingAdapterFileError(f"adapter '{adapter_id}': {name} is missing")


def header_too_large(adapter_id: str, size: int, limit: int) -> InvalidAdapterError:
    return InvalidAdapterError(
        f"adapter '{adapter_id}': {WEIGHTS_NAME} declares a {size}-byte header (its tensor index), more than "
        f"the limit {limit}; a LoRA adapter's header is a few KB (about 150 bytes per tensor): re-save it with "
        "PEFT's save_pretrained without large metadata, or raise store.max_safetensors_header_bytes"
    )
