"""Loading the base model: a local folder, its architecture checked, on the device and dtype asked.

The Hugging Face model is loaded as it is (bitsandbytes quantization, weight formats and rotary
scaling come from transformers); model_runner.py then drives its submodules with our own
decoder loop. That loop only knows the architectures in arch/, so ``config.architectures`` is
checked against that registry before any weight is read: an unknown architecture is refused
with its name, the supported list and where to add one -- never loaded and served wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from serve_app.engine.arch import spec_for, spec_for_names
from serve_app.engine.config import EngineConfig


def resolve_device_dtype(cfg: EngineConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def quantization_config(kind: str, dtype: torch.dtype):
    """BitsAndBytesConfig for an NF4 or int8 base (None for an unquantized one)."""
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def check_architecture(path: Path) -> None:
    """Refuse a model folder whose ``config.json`` names no architecture arch/ knows (before
    any weight is read). A config that names none is checked once loaded, by its class."""
    try:
        names = json.loads((path / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return  # transformers reports an unreadable config in its own words
    if names:
        spec_for_names(names, names[0])


def load_base_model(cfg: EngineConfig):
    """Load tokenizer + causal LM from a local folder; never touches a model hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.model)
    if not (path / "config.json").is_file():
        raise ValueError(f"base model folder {path} has no config.json; pass a local Hugging Face model folder")
    check_architecture(path)
    device, dtype = resolve_device_dtype(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    kwargs = dict(dtype=dtype, local_files_only=True)
    qcfg = quantization_config(cfg.quantization, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    spec_for(model)  # a config without ``architectures``: the class transformers chose must be known too
    if qcfg is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, device, dtype


def eos_ids(model, tokenizer) -> frozenset[int]:
    """The token IDs that end a generation: the generation config's and the tokenizer's."""
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return frozenset(ids)
