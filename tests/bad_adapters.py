"""Broken and hostile adapter folders, each made from a good one, with the error it must get.

Used by the unit tests (load_lora_weights, the fetcher) and the serve tests (HTTP 422 with the
message, while good tenants keep serving). Each case: folder name -> (status, message regex).
The regexes check that the message names the adapter, the offending value and the limit/fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# Limits the cases are built against (the app/test must configure these).
MAX_RANK = 32
MAX_ADAPTER_BYTES = 1 << 20

BAD_CASES: dict[str, tuple[int, str]] = {
    "bad-no-config": (422, r"'bad-no-config.*': adapter_config\.json is missing .*save_pretrained"),
    "bad-json": (422, r"'bad-json.*': adapter_config\.json is not valid JSON"),
    "bad-pickle": (422, r"'bad-pickle.*': adapter_model\.bin is a pickle file and is refused .*safe_serialization=True"),
    "bad-no-weights": (422, r"'bad-no-weights.*': adapter_model\.safetensors is missing"),
    "bad-shape": (422, r"'bad-shape.*': layer \d+ \w+: shapes lora_A \(\d+, 72\) .*do not fit the base projection "
                       r"\(64 -> \d+\); was it trained for another base model\?"),
    "bad-base": (422, r"'bad-base.*': base_model_name_or_path 'meta-llama/Llama-2-13b-hf' does not match the "
                      r"served base 'demo-base'.*base_model_aliases"),
    "bad-rank": (422, r"'bad-rank.*': LoRA rank 64 is greater than max_lora_rank 32; raise max_lora_rank"),
    "bad-targets": (422, r"'bad-targets.*': target modules \['c_attn'\] are not LoRA-capable projections .*"
                         r"this server wraps"),
    "bad-nan": (422, r"'bad-nan.*': layer \d+ \w+ lora_[AB] has NaN or inf values .*re-export"),
    "bad-size": (422, r"'bad-size.*': weights are \d+ bytes, more than max_adapter_bytes 1048576; raise "
                      r"store\.max_adapter_bytes"),
    "bad-corrupt": (422, r"'bad-corrupt.*': adapter_model\.safetensors could not be read"),
}


def _rewrite(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    save_file(fn(tensors), path / "adapter_model.safetensors")


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def make_bad_adapters(good: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write every BAD_CASES folder under ``out_dir`` (good: an attention-only TINY adapter)."""
    good, out_dir = Path(good), Path(out_dir)
    out = {}
    for name in BAD_CASES:
        dst = out_dir / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(good, dst)
        out[name] = dst
    (out["bad-no-config"] / "adapter_config.json").unlink()
    (out["bad-json"] / "adapter_config.json").write_text("{not json")
    (out["bad-pickle"] / "adapter_model.safetensors").rename(out["bad-pickle"] / "adapter_model.bin")
    (out["bad-no-weights"] / "adapter_model.safetensors").unlink()
    _rewrite(out["bad-shape"], lambda t: {k: (torch.zeros(v.shape[0], v.shape[1] + 8) if "lora_A" in k else v)
                                          for k, v in t.items()})
    _edit_config(out["bad-base"], base_model_name_or_path="meta-llama/Llama-2-13b-hf")
    _edit_config(out["bad-rank"], r=64)
    _edit_config(out["bad-targets"], target_modules=["q_proj", "c_attn"])

    def poison(t):
        k = sorted(t)[0]
        t[k] = t[k].clone()
        t[k][0, 0] = float("inf")
        return t

    _rewrite(out["bad-nan"], poison)
    _rewrite(out["bad-size"], lambda t: {**t, "padding": torch.zeros(MAX_ADAPTER_BYTES // 4 + 1024)})
    (out["bad-corrupt"] / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" * 8)
    return out
