"""Read and validate a PEFT LoRA adapter folder into plain tensors, ready to copy into the pool.

Everything that can be wrong with an adapter is caught here, before any byte reaches device
memory, and reported with the adapter's name, the offending value, the limit and the fix.
Weights load only from safetensors: a pickle (``adapter_model.bin``) can run code on load.

Two halves, because a tenant controls both files, and neither needs the engine thread:
``parse_adapter_config`` is pure Python (JSON, scalars, rank_pattern / alpha_pattern matched
literally -- never a tenant's regex); ``load_adapter_tensors`` reads the safetensors file with
numpy (its header length first: a header over ``max_header_bytes`` is refused unread) and
validates what the pool will hold: the weights after the alpha/r scaling and the cast to the
compute dtype, finite, with a gain that cannot overflow it. It runs no torch kernel, so it can
run on a worker thread beside the engine's OpenMP team; only the copy into the pool
(``LoRAManager.add``) runs on the engine thread.

A file missing from the folder is ``MissingAdapterFileError`` (a 422 for a folder given by path;
the loader, whose fetch saw it listed, takes it for a vanished copy and fetches it again).
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

import numpy as np
import torch

from serve_app.adapters.peft_files import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    PICKLE_NAME,
    WEIGHTS_NAME,
    config_too_large,
    header_too_large,
    missing_file,
    pickle_refused,
    weights_too_large,
)
from serve_app.adapters.safetensors_file import (
    FLOAT_DTYPES,
    MAX_HEADER_BYTES,
    HeaderTooLargeError,
    SafetensorsFormatError,
    TensorEntry,
    read_array,
    read_index,
)
from serve_app.engine.arch import get_arch
from serve_app.engine.arch.base import BaseShape
from serve_app.errors import AdapterNotFoundError, InvalidAdapterError

logger = logging.getLogger(__name__)


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
        logger.info("adapter %s: no folder at %s", adapter_id, path)  # the path is for the log, not the tenant
        raise AdapterNotFoundError(f"adapter '{adapter_id}' not found in the adapter store")
    cfg_path = path / CONFIG_NAME
    try:
        # One open: a file that vanishes after a check (a disk-cache eviction) is "missing", a
        # miss the loader fetches again, never "not valid JSON", a refusal it would remember.
        with open(cfg_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_CONFIG_BYTES:
                raise config_too_large(adapter_id, size)
            text = f.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        raise missing_file(adapter_id, CONFIG_NAME) from None
    except UnicodeDecodeError as e:
        raise _fail(adapter_id, f"{CONFIG_NAME} is not valid JSON ({e})") from None
    except IsADirectoryError:
        raise _fail(adapter_id, f"{CONFIG_NAME} is a folder, not a file; save the adapter with PEFT's save_pretrained") from None
    except OSError as e:
        logger.warning("adapter %s: %s could not be read: %s", adapter_id, cfg_path, e)
        raise _fail(adapter_id, f"{CONFIG_NAME} could not be read ({type(e).__name__})") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(adapter_id, f"{CONFIG_NAME} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise _fail(adapter_id, f"{CONFIG_NAME} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


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


# ---- the config half: pure Python, no torch, safe on any thread ------------------------------

# PEFT writes rank_pattern / alpha_pattern keys as module names or dotted suffixes of them
# ("q_proj", "layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj") and matches them with
# ``re.match(rf"(.*\.)?({key})$", name)``. Running a tenant's regex is a denial of service (a
# nested quantifier backtracks for minutes on the thread that serves everyone), so we accept
# only keys made of name characters and match them literally at a dot boundary: for such keys
# that is exactly PEFT's result.
_PATTERN_KEY_RE = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
MAX_PATTERN_KEYS = 4096


def _dotted_suffixes(name: str) -> list[str]:
    """'model.layers.3.mlp.up_proj' -> itself, 'layers.3.mlp.up_proj', ..., 'up_proj'."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


@dataclass(frozen=True)
class PatternTable:
    """A validated ``rank_pattern`` / ``alpha_pattern``: literal keys in the config's order."""

    order: dict[str, int]  # key -> position in the config (PEFT: the first match wins)
    values: tuple

    def lookup(self, module_name: str, default):
        best = None
        for suffix in _dotted_suffixes(module_name):
            pos = self.order.get(suffix)
            if pos is not None and (best is None or pos < best):
                best = pos
        return default if best is None else self.values[best]


def _pattern_table(adapter_id: str, cfg: dict, field_name: str, check_value) -> PatternTable:
    raw = cfg.get(field_name)
    if raw in (None, {}):
        return PatternTable({}, ())
    if not isinstance(raw, dict):
        raise _fail(adapter_id, f"{field_name} must be a JSON object of module name -> value, got {type(raw).__name__}")
    if len(raw) > MAX_PATTERN_KEYS:
        raise _fail(adapter_id, f"{field_name} has {len(raw)} keys, more than the limit {MAX_PATTERN_KEYS}")
    order, values = {}, []
    for key, value in raw.items():
        if not _PATTERN_KEY_RE.fullmatch(key):
            shown = key if len(key) <= 80 else key[:77] + "..."
            raise _fail(
                adapter_id,
                f"{field_name} key {shown!r} is not a module name or dotted suffix of one (like 'q_proj' or "
                "'layers.3.self_attn.q_proj'); regular expressions are not accepted in patterns, list the "
                "modules instead",
            )
        order.setdefault(key, len(values))
        values.append(check_value(key, value))
    return PatternTable(order, tuple(values))


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter's validated ``adapter_config.json``: what the tensors must look like and how
    they are scaled. Built by ``parse_adapter_config`` without torch, off the engine thread."""

    adapter_id: str
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: PatternTable
    alpha_pattern: PatternTable
    config: dict = field(repr=False, hash=False, compare=False)
    warnings: tuple[str, ...] = ()
    arch: str = "LlamaForCausalLM"  # the base's architecture: how PEFT names its modules (arch/)

    def rank_for(self, layer: int, kind: str) -> int:
        return self.rank_pattern.lookup(get_arch(self.arch).peft_module_name(layer, kind), self.r)

    def scale_for(self, layer: int, kind: str, rank: int) -> float:
        alpha = self.alpha_pattern.lookup(get_arch(self.arch).peft_module_name(layer, kind), self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _finite_number(adapter_id: str, what: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _fail(adapter_id, f"{what}={value!r} must be a finite number")
    return float(value)


def parse_adapter_config(
    adapter_id: str,
    path: str | os.PathLike,
    base: BaseShape,
    *,
    max_rank: int,
    base_mismatch: Literal["ignore", "warn", "refuse"] = "warn",
    base_aliases: Sequence[str] = (),
) -> AdapterSpec:
    """Read and validate ``adapter_config.json``; raises InvalidAdapterError naming the problem."""
    cfg = read_adapter_config(adapter_id, path)
    warnings = []
    mismatch = check_base_model(adapter_id, cfg, base, base_mismatch, base_aliases)
    if mismatch:
        logger.warning("%s", mismatch)
        warnings.append(mismatch)

    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _fail(adapter_id, f"peft_type {peft_type[:40]} is not supported; only LORA adapters can be served")
    if cfg.get("use_dora"):
        raise _fail(adapter_id, "DoRA adapters (use_dora=true) are not supported; retrain with use_dora=false")
    if cfg.get("modules_to_save"):
        raise _fail(
            adapter_id,
            f"modules_to_save {str(cfg['modules_to_save'])[:200]} would replace base weights per tenant; "
            "only LoRA deltas can be served from a shared base",
        )
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _fail(adapter_id, f"rank r={r!r} in {CONFIG_NAME} must be a positive integer")
    if r > max_rank:
        raise _fail(adapter_id, f"LoRA rank {r} is greater than max_lora_rank {max_rank}; raise max_lora_rank")
    alpha = _finite_number(adapter_id, "lora_alpha", cfg.get("lora_alpha", 8))
    use_rslora = cfg.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _fail(adapter_id, f"use_rslora={use_rslora!r} must be true or false")

    def check_rank(key, value):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= max_rank:
            raise _fail(
                adapter_id,
                f"rank_pattern[{key!r}]={value!r} must be an integer in [1, max_lora_rank {max_rank}]",
            )
        return value

    rank_pattern = _pattern_table(adapter_id, cfg, "rank_pattern", check_rank)
    alpha_pattern = _pattern_table(
        adapter_id, cfg, "alpha_pattern", lambda key, value: _finite_number(adapter_id, f"alpha_pattern[{key!r}]", value)
    )

    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        if not all(isinstance(t, str) for t in targets):
            raise _fail(adapter_id, "target_modules must be a list of module names")
        unknown = sorted({t.rsplit(".", 1)[-1] for t in targets} - set(base.kinds))
        if unknown:
            raise _fail(
                adapter_id,
                f"target modules {unknown[:8]} are not LoRA-capable projections of the base model "
                f"(this server wraps {sorted(base.kinds)}); retrain with target_modules among those",
            )
    return AdapterSpec(
        adapter_id=adapter_id, r=r, lora_alpha=alpha, use_rslora=use_rslora, rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, config=cfg, warnings=tuple(warnings), arch=base.arch,
    )


# ---- the tensor half: numpy, no torch kernel, safe on any thread ---------------------------------
#
# It runs on a worker thread (the deployment's parse executor), not the engine thread: an 86 MB
# safetensors header alone held the engine thread, and every tenant's decode, for 825 ms. It
# uses no torch kernel, because a torch op on a second thread starts a second OpenMP team
# beside the engine's, and that slows every decode step afterwards (engine.py, LoRAEngine):
# the file is read with numpy (adapters/safetensors_file.py), checked and cast with numpy, and
# the pool-layout arrays are handed to torch without a copy (``torch.from_numpy``). Only the
# copy into the pool (``LoRAManager.add``) runs on the engine thread.


def lora_gain_bound(dtype: torch.dtype) -> float:
    """The largest LoRA gain an adapter may have when computed in ``dtype``.

    With activations of norm up to sqrt(max) -- per element up to sqrt(max / in_features), far
    above what a decoder produces -- the intermediate ``h = x @ A.T`` stays finite when each A
    row's norm is at most sqrt(max), and the delta ``h @ B`` stays finite when
    ||A||_F * max_k ||B[:, k]|| <= sqrt(max) (Cauchy-Schwarz twice). For float32 / bfloat16
    that is 1.8e19, for float16 256.
    """
    return math.sqrt(torch.finfo(dtype).max)


# The pool dtype -> the numpy dtype its values are stored in (bfloat16: its bit pattern).
_STORAGE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
            torch.bfloat16: np.uint16}


def _cast(x: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(the values ``x.to(dtype)`` holds, as float16/32/64; its storage for the pool), rounded as
    torch rounds: float64 -> float32 -> float16 / bfloat16, each round-to-nearest-even."""
    if dtype == torch.float64:
        out = np.asarray(x, dtype=np.float64)
        return out, out
    f32 = np.asarray(x, dtype=np.float32)
    if dtype == torch.float32:
        return f32, f32
    if dtype == torch.float16:
        f16 = f32.astype(np.float16)
        return f16, f16
    if dtype != torch.bfloat16:
        raise ValueError(f"pool dtype {dtype} is not float32, float16, bfloat16 or float64")
    if not np.isfinite(f32).all():  # beyond float32 already: no rounding can make it finite
        return f32, np.zeros(f32.shape, np.uint16)
    bits = np.ascontiguousarray(f32).view(np.uint32)
    # c10::BFloat16's round-to-nearest-even (finite inputs: no uint32 wrap-around)
    b16 = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    return (b16.astype(np.uint32) << 16).view(np.float32), b16


def _to_torch(storage: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(storage)  # no copy, no kernel
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _sq_norms(x: np.ndarray, axis: int | None) -> np.ndarray:
    """Squared norms in float64 without BLAS (numpy's dot would start OpenBLAS threads)."""
    x64 = x.astype(np.float64)
    return np.einsum("ij,ij->i" if axis == 1 else "ij,ij->j" if axis == 0 else "ij,ij->", x64, x64)


def load_adapter_tensors(
    spec: AdapterSpec,
    path: str | os.PathLike,
    base: BaseShape,
    *,
    max_rank: int,
    dtype: torch.dtype,
    max_bytes: int = 1 << 30,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> LoRAWeights:
    """Read, check and scale an adapter's tensors into the pool layout (``LoRAWeights``), on
    the caller's thread (numpy; see above).

    Validates what the pool will hold, not only the file: after the alpha/r scaling and the cast
    to ``dtype`` every value is finite and the adapter's gain is within ``lora_gain_bound``.
    The header is checked before any tensor is read: its size (``max_header_bytes``, refused
    before it is read), names, dtypes, shapes and ranks.
    """
    adapter_id = spec.adapter_id
    path = Path(path)
    weights_path = path / WEIGHTS_NAME
    if dtype not in _STORAGE:
        raise ValueError(f"pool dtype {dtype} is not float32, float16, bfloat16 or float64")
    try:
        f = open(weights_path, "rb")
    except (FileNotFoundError, NotADirectoryError):
        if (path / PICKLE_NAME).exists():
            raise pickle_refused(adapter_id) from None
        raise missing_file(adapter_id, WEIGHTS_NAME) from None
    except OSError as e:
        logger.warning("adapter %s: %s could not be opened: %s", adapter_id, weights_path, e)
        raise _fail(adapter_id, f"{WEIGHTS_NAME} could not be read ({type(e).__name__}); re-export the adapter") from None
    # From here on the open file is read: a disk-cache eviction cannot take it away mid-parse.
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise weights_too_large(adapter_id, size, max_bytes)
        try:
            index = read_index(f, max_header_bytes=max_header_bytes)
        except HeaderTooLargeError as e:
            raise header_too_large(adapter_id, e.size, e.limit) from None
        except (SafetensorsFormatError, OSError) as e:
            # The reason may name tensors but never the file's path (it goes to the log).
            logger.warning("adapter %s: %s could not be read: %s", adapter_id, weights_path, e)
            raise _fail(adapter_id, f"{WEIGHTS_NAME} could not be read ({e}); re-export the adapter") from None
        found = _index_lora_pairs(adapter_id, index, base, spec, max_rank)
        try:
            a_out, b_out = _read_checked(adapter_id, f, found, base, spec, dtype)
        except (SafetensorsFormatError, OSError) as e:
            logger.warning("adapter %s: %s could not be read: %s", adapter_id, weights_path, e)
            raise _fail(adapter_id, f"{WEIGHTS_NAME} could not be read ({e}); re-export the adapter") from None
    raw_bytes = sum(e.nbytes for layers in found.values() for ab in layers.values() for e in ab.values())
    return LoRAWeights(
        adapter_id=adapter_id,
        a=a_out,
        b=b_out,
        rank=spec.r,
        raw_bytes=raw_bytes,
        base_model_name_or_path=spec.config.get("base_model_name_or_path"),
        config=spec.config,
        warnings=list(spec.warnings),
    )


def _index_lora_pairs(adapter_id: str, index: dict[str, TensorEntry], base: BaseShape, spec: AdapterSpec,
                      max_rank: int) -> dict[str, dict[int, dict[str, TensorEntry]]]:
    """kind -> layer -> {"A": entry, "B": entry}, every name, dtype, shape and rank checked from
    the header alone (no tensor read yet)."""
    found: dict[str, dict[int, dict[str, TensorEntry]]] = {}
    arch = get_arch(base.arch)
    for key, entry in index.items():
        parsed = arch.parse_peft_key(key)
        if parsed is None:
            if "lora_embedding" in key or "magnitude" in key:
                raise _fail(adapter_id, f"tensor {key[:200]} is not supported (embedding LoRA / DoRA)")
            raise _fail(adapter_id, f"tensor {key[:200]} is not a LoRA weight of a decoder projection")
        layer, kind, ab = parsed
        if kind not in base.kinds:
            raise _fail(
                adapter_id,
                f"target module {kind} (tensor {key[:200]}) is not a LoRA-capable projection of the base "
                f"model (this server wraps {sorted(base.kinds)})",
            )
        if layer >= base.num_layers:
            raise _fail(adapter_id, f"tensor {key[:200]} is for layer {layer}; the base has {base.num_layers} layers")
        if entry.dtype not in FLOAT_DTYPES:
            raise _fail(
                adapter_id,
                f"tensor {key[:200]} has dtype {entry.dtype_name}; LoRA weights must be "
                "float32, float16, bfloat16 or float64 (re-save the adapter unquantized)",
            )
        found.setdefault(kind, {}).setdefault(layer, {})[ab] = entry
    if not found:
        raise _fail(adapter_id, f"{WEIGHTS_NAME} holds no LoRA weights")
    for kind, layers in sorted(found.items()):
        in_f, out_f = base.kinds[kind]
        for layer, ab in layers.items():
            if set(ab) != {"A", "B"}:
                raise _fail(adapter_id, f"layer {layer} {kind} has lora_{next(iter(ab))} but not its pair")
            a, b = ab["A"].shape, ab["B"].shape
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise _fail(
                    adapter_id,
                    f"layer {layer} {kind}: lora_A {tuple(a)} and lora_B {tuple(b)} are not a rank-r pair",
                )
            if a[1] != in_f or b[0] != out_f:
                raise _fail(
                    adapter_id,
                    f"layer {layer} {kind}: shapes lora_A {tuple(a)} / lora_B {tuple(b)} do not fit "
                    f"the base projection ({in_f} -> {out_f}); was it trained for another base model?",
                )
            if a[0] > max_rank:
                raise _fail(
                    adapter_id, f"LoRA rank {a[0]} is greater than max_lora_rank {max_rank}; raise max_lora_rank"
                )
            expected = spec.rank_for(layer, kind)
            if a[0] != expected:
                raise _fail(
                    adapter_id,
                    f"layer {layer} {kind} has rank {a[0]} but {CONFIG_NAME} says {expected} "
                    "(r / rank_pattern); re-export the adapter with PEFT's save_pretrained",
                )
    return found


def _read_checked(adapter_id: str, f, found: dict[str, dict[int, dict[str, TensorEntry]]], base: BaseShape,
                  spec: AdapterSpec, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read every pair, check it finite, scale and cast it as the pool will hold it, check its
    gain, and lay it out as ``LoRAWeights`` (a ``[layers, r, in]``, b ``[layers, r, out]``)."""
    bound = lora_gain_bound(dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    storage = _STORAGE[dtype]
    a_out: dict[str, torch.Tensor] = {}
    b_out: dict[str, torch.Tensor] = {}
    for kind, layers in sorted(found.items()):
        in_f, out_f = base.kinds[kind]
        # rank_pattern can give layers different ranks; pad within this kind only.
        r_kind = max(ab["A"].shape[0] for ab in layers.values())
        a_kind = np.zeros((base.num_layers, r_kind, in_f), dtype=storage)
        b_kind = np.zeros((base.num_layers, r_kind, out_f), dtype=storage)
        for layer, ab in sorted(layers.items()):
            a, b = read_array(f, ab["A"]), read_array(f, ab["B"])
            for name, t in (("lora_A", a), ("lora_B", b)):
                if not np.isfinite(t).all():
                    raise _fail(
                        adapter_id,
                        f"layer {layer} {kind} {name} has NaN or inf values (every value must be finite); "
                        "the training diverged or the file is corrupt: re-export the adapter",
                    )
            rl = a.shape[0]
            scale = spec.scale_for(layer, kind, rl)
            a_vals, a_store = _cast(a, dtype)  # [r, in]
            with np.errstate(over="ignore"):  # an overflow is caught below, by name
                b_vals, b_store = _cast(b.astype(np.float64).T * scale, dtype)  # [r, out], alpha/r folded in
            # What the pool will hold: finite after the scaling and the cast, and a gain that
            # cannot overflow ``dtype`` (float64 norms: the squares of float32 values fit).
            if not (np.isfinite(a_vals).all() and np.isfinite(b_vals).all()):
                raise _fail(
                    adapter_id,
                    f"layer {layer} {kind}: after scaling by lora_alpha/r = {scale:.3g} and the cast to {dtype_name} "
                    f"the weights are not finite (beyond {dtype_name}'s max {torch.finfo(dtype).max:.3g}); "
                    "check lora_alpha / alpha_pattern, or serve with dtype float32",
                )
            a_row = math.sqrt(float(_sq_norms(a_vals, 1).max()))
            gain = math.sqrt(float(_sq_norms(a_vals, None))) * math.sqrt(float(_sq_norms(b_vals, 0).max()))
            if a_row > bound or not math.isfinite(gain) or gain > bound:
                raise _fail(
                    adapter_id,
                    f"layer {layer} {kind}: LoRA gain ||A||_F * max column norm of B = {gain:.3g} after scaling by "
                    f"lora_alpha/r = {scale:.3g} (largest A row norm {a_row:.3g}) exceeds {bound:.3g} = "
                    f"sqrt({dtype_name} max), the bound that keeps x @ A and h @ B finite in {dtype_name} for "
                    f"activations up to sqrt(max / in_features {in_f}) per element; check lora_alpha / alpha_pattern",
                )
            a_kind[layer, :rl] = a_store
            b_kind[layer, :rl] = b_store
        a_out[kind], b_out[kind] = _to_torch(a_kind, dtype), _to_torch(b_kind, dtype)
    return a_out, b_out


def load_lora_weights(
    adapter_id: str,
    path: str | os.PathLike,
    base: BaseShape,
    *,
    max_rank: int,
    dtype: torch.dtype,
    max_bytes: int = 1 << 30,
    max_header_bytes: int = MAX_HEADER_BYTES,
    base_mismatch: Literal["ignore", "warn", "refuse"] = "warn",
    base_aliases: Sequence[str] = (),
) -> LoRAWeights:
    """Parse and validate one adapter folder (config, then tensors); raises InvalidAdapterError."""
    spec = parse_adapter_config(
        adapter_id, path, base, max_rank=max_rank, base_mismatch=base_mismatch, base_aliases=base_aliases
    )
    return load_adapter_tensors(spec, path, base, max_rank=max_rank, dtype=dtype, max_bytes=max_bytes,
                                max_header_bytes=max_header_bytes)
