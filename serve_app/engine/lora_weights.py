"""Read and validate a PEFT LoRA adapter folder into plain tensors, ready to copy into the pool.

Everything that can be wrong with an adapter is caught here, before any byte reaches device
memory, and reported with the adapter's name, the offending value, the limit and the fix.
Weights load only from safetensors: a pickle (``adapter_model.bin``) can run code on load.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from safetensors import safe_open

from serve_app.errors import AdapterNotFoundError, InvalidAdapterError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # the LoRA settings are a few hundred bytes

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (PEFT's saved names; an
# adapter name such as ".default" may appear before ".weight" in hand-made files).
_KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass(frozen=True)
class BaseShape:
    """What an adapter must fit: per projection kind, (in_features, out_features)."""

    num_layers: int
    kinds: dict[str, tuple[int, int]]
    name: str = ""


@dataclass
class LoRAWeights:
    """A validated adapter in the pool's layout.

    Per projection kind: ``a[kind]`` is ``[num_layers, r_kind, in]`` and ``b[kind]`` is
    ``[num_layers, r_kind, out]`` (lora_B transposed, with alpha/r folded in) so the runtime
    computes ``(x @ a.T) @ b`` with no per-request scaling. Layers the adapter skips are zero.
    """

    adapter_id: str
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    rank: int  # the config's r, for reporting
    raw_bytes: int  # bytes of the lora_A/lora_B tensors as stored in the file
    base_model_name_or_path: str | None = None
    config: dict = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)  # accepted, but worth telling the operator

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


def _fail(adapter_id: str, problem: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"adapter '{adapter_id}': {problem}")


def read_adapter_config(adapter_id: str, path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise AdapterNotFoundError(f"adapter '{adapter_id}' not found: no folder at {path}")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise _fail(adapter_id, f"{CONFIG_NAME} is missing in {path}; save the adapter with PEFT's save_pretrained")
    size = cfg_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise _fail(
            adapter_id, f"{CONFIG_NAME} is {size} bytes, more than the limit {MAX_CONFIG_BYTES}; it should hold "
            "only the LoRA settings"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(adapter_id, f"{CONFIG_NAME} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise _fail(adapter_id, f"{CONFIG_NAME} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _alpha_for(module_name: str, cfg: dict, default_alpha: float) -> float:
    # PEFT matches pattern keys against the end of the module's name.
    for key, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return float(alpha)
    return default_alpha


def _base_key(name: str) -> str:
    """'meta-llama/Llama-2-7b-hf', '/models/Llama-2-7b-hf/' -> 'llama-2-7b-hf'."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()


def check_base_model(
    adapter_id: str,
    cfg: dict,
    base: BaseShape,
    mode: Literal["ignore", "warn", "refuse"],
    aliases: Sequence[str] = (),
) -> str | None:
    """The mismatch message (a warning) if the adapter names another base; raises in 'refuse' mode.

    Names are compared by their last path component, case-insensitive, so a hub ID and a local
    folder of the same model match. Unknown on either side: nothing to compare.
    """
    claimed = cfg.get("base_model_name_or_path")
    if mode == "ignore" or not isinstance(claimed, str) or not claimed.strip() or not base.name:
        return None
    accepted = {_base_key(n) for n in (base.name, *aliases) if n}
    if _base_key(claimed) in accepted:
        return None
    problem = (
        f"base_model_name_or_path {claimed!r} does not match the served base {_base_key(base.name)!r} "
        f"(compared by last path component; accepted: {sorted(accepted)})"
    )
    if mode == "refuse":
        raise _fail(
            adapter_id,
            f"{problem}; serve it with the base it was trained on, add the name to store.base_model_aliases "
            "if it is the same model, or set store.base_model_mismatch: warn",
        )
    return f"adapter '{adapter_id}': {problem}; served anyway (store.base_model_mismatch: warn)"


def load_lora_weights(
    adapter_id: str,
    path: str | os.PathLike,
    base: BaseShape,
    *,
    max_rank: int,
    dtype: torch.dtype,
    max_bytes: int = 1 << 30,
    base_mismatch: Literal["ignore", "warn", "refuse"] = "warn",
    base_aliases: Sequence[str] = (),
) -> LoRAWeights:
    """Parse and validate one adapter folder; raises InvalidAdapterError naming the problem."""
    path = Path(path)
    cfg = read_adapter_config(adapter_id, path)
    warnings = []
    mismatch = check_base_model(adapter_id, cfg, base, base_mismatch, base_aliases)
    if mismatch:
        logger.warning("%s", mismatch)
        warnings.append(mismatch)

    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _fail(adapter_id, f"peft_type {peft_type} is not supported; only LORA adapters can be served")
    if cfg.get("use_dora"):
        raise _fail(adapter_id, "DoRA adapters (use_dora=true) are not supported; retrain with use_dora=false")
    if cfg.get("modules_to_save"):
        raise _fail(
            adapter_id,
            f"modules_to_save {cfg['modules_to_save']} would replace base weights per tenant; "
            "only LoRA deltas can be served from a shared base",
        )
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _fail(adapter_id, f"rank r={r!r} in {CONFIG_NAME} must be a positive integer")
    if r > max_rank:
        raise _fail(adapter_id, f"LoRA rank {r} is greater than max_lora_rank {max_rank}; raise max_lora_rank")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise _fail(adapter_id, f"lora_alpha={alpha!r} must be a finite number")
    use_rslora = bool(cfg.get("use_rslora", False))

    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        unknown = sorted({t.rsplit(".", 1)[-1] for t in targets} - set(base.kinds))
        if unknown:
            raise _fail(
                adapter_id,
                f"target modules {unknown} are not LoRA-capable projections of the base model "
                f"(this server wraps {sorted(base.kinds)}); retrain with target_modules among those",
            )

    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        if (path / "adapter_model.bin").exists():
            raise _fail(
                adapter_id,
                "adapter_model.bin is a pickle file and is refused (it can run code when loaded); "
                "re-save the adapter with safe_serialization=True to get adapter_model.safetensors",
            )
        raise _fail(adapter_id, f"{WEIGHTS_NAME} is missing in {path}")
    size = weights_path.stat().st_size
    if size > max_bytes:
        raise _fail(
            adapter_id,
            f"weights are {size} bytes, more than max_adapter_bytes {max_bytes}; raise store.max_adapter_bytes "
            "if this adapter is expected to be that large",
        )

    # kind -> layer -> {"A": tensor, "B": tensor}
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    raw_bytes = 0
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                m = _KEY_RE.search(key)
                if m is None:
                    if "lora_embedding" in key or "magnitude" in key:
                        raise _fail(adapter_id, f"tensor {key} is not supported (embedding LoRA / DoRA)")
                    raise _fail(adapter_id, f"tensor {key} is not a LoRA weight of a decoder projection")
                layer, kind, ab = int(m.group(1)), m.group(2), m.group(3)
                if kind not in base.kinds:
                    raise _fail(
                        adapter_id,
                        f"target module {kind} (tensor {key}) is not a LoRA-capable projection of the base "
                        f"model (this server wraps {sorted(base.kinds)})",
                    )
                if layer >= base.num_layers:
                    raise _fail(adapter_id, f"tensor {key} is for layer {layer}; the base has {base.num_layers} layers")
                t = f.get_tensor(key)
                raw_bytes += t.numel() * t.element_size()
                found.setdefault(kind, {}).setdefault(layer, {})[ab] = t
    except InvalidAdapterError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise _fail(adapter_id, f"{WEIGHTS_NAME} could not be read ({type(e).__name__}: {e})") from None
    if not found:
        raise _fail(adapter_id, f"{WEIGHTS_NAME} holds no LoRA weights")

    a_out: dict[str, torch.Tensor] = {}
    b_out: dict[str, torch.Tensor] = {}
    for kind, layers in sorted(found.items()):
        in_f, out_f = base.kinds[kind]
        ranks = set()
        for layer, ab in layers.items():
            if set(ab) != {"A", "B"}:
                raise _fail(adapter_id, f"layer {layer} {kind} has lora_{next(iter(ab))} but not its pair")
            a, b = ab["A"], ab["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise _fail(
                    adapter_id,
                    f"layer {layer} {kind}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a rank-r pair",
                )
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise _fail(
                    adapter_id,
                    f"layer {layer} {kind}: shapes lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                    f"the base projection ({in_f} -> {out_f}); was it trained for another base model?",
                )
            if a.shape[0] > max_rank:
                raise _fail(
                    adapter_id, f"LoRA rank {a.shape[0]} is greater than max_lora_rank {max_rank}; raise max_lora_rank"
                )
            for name, t in (("lora_A", a), ("lora_B", b)):
                if not torch.isfinite(t).all():
                    raise _fail(
                        adapter_id,
                        f"layer {layer} {kind} {name} has NaN or inf values (every value must be finite); "
                        "the training diverged or the file is corrupt: re-export the adapter",
                    )
            ranks.add(a.shape[0])
        # rank_pattern can give layers different ranks; pad within this kind only.
        r_kind = max(ranks)
        a_kind = torch.zeros(base.num_layers, r_kind, in_f, dtype=dtype)
        b_kind = torch.zeros(base.num_layers, r_kind, out_f, dtype=dtype)
        for layer, ab in layers.items():
            a, b = ab["A"], ab["B"]
            rl = a.shape[0]
            lora_alpha = _alpha_for(f"layers.{layer}.{kind}", cfg, float(alpha))
            scale = lora_alpha / math.sqrt(rl) if use_rslora else lora_alpha / rl
            a_kind[layer, :rl] = a.to(dtype)
            b_kind[layer, :rl] = (b.float().t() * scale).to(dtype)
        a_out[kind], b_out[kind] = a_kind, b_kind

    return LoRAWeights(
        adapter_id=adapter_id,
        a=a_out,
        b=b_out,
        rank=r,
        raw_bytes=raw_bytes,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        config=cfg,
        warnings=warnings,
    )
