"""Hostile adapter folders for the tenant-isolation suite (tests/serve/test_hostile.py).

Each one is a real demo adapter with its config or tensors edited so that the FILE looks fine
(valid JSON, finite numbers where JSON allows them, a readable safetensors) but what the pool
would hold is not: values that overflow float32 once ``alpha/r`` scaling is applied, non-finite
or non-numeric ``alpha_pattern`` / ``rank_pattern`` values, pattern keys that are regular
expressions with nested quantifiers (catastrophic backtracking when run with ``re``), and
tensor dtypes that are not floats. Every case must be refused with a 422 ``invalid_adapter``
whose message names the adapter and matches the regex here (the offending field or tensor),
while the tenants batched beside it keep getting exact outputs.

Also here: adapters that are legal but unusual, whose outputs must equal plain PEFT's
(``make_pattern_adapter``: literal rank_pattern / alpha_pattern keys in PEFT's own format), and
a large zero-padded copy of a good adapter (``make_padded_adapter``: same function, a bigger
file, so its registration takes long enough to be interrupted).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# A pattern key that backtracks for ~1 s (2 cores, loaded) per match against the module name
# "layers.<n>.<kind>" with PEFT's ``re.match(rf"(.*\.)?({key})$", name)``: the nested
# quantifier explores every split of the 13 characters after "la". A server that runs it on
# the engine thread stalls every tenant for seconds per projection.
SLOW_KEY = "la(.*.*)*z"

# name -> (good demo adapter it is made from, HTTP status, regex the error message must match).
# The regexes name the adapter and the field or tensor at fault, not the exact wording.
OVERFLOW_CASES: dict[str, tuple[str, int, str]] = {
    # finite JSON, finite weights; the scaled B is ~1e28: x @ A @ B overflows float32 downstream
    "hx-alpha-huge": ("tenant-0", 422, r"'hx-alpha-huge.*lora_alpha"),
    # JSON `Infinity`: alpha/r = inf, so the pool would hold inf (and 0 * inf = NaN in other rows)
    "hx-alpha-pattern-inf": ("tenant-0", 422, r"'hx-alpha-pattern-inf.*alpha_pattern"),
    "hx-alpha-pattern-nan": ("tenant-0", 422, r"'hx-alpha-pattern-nan.*alpha_pattern"),
    "hx-alpha-pattern-str": ("tenant-0", 422, r"'hx-alpha-pattern-str.*alpha_pattern"),
    # rank_pattern values PEFT itself could never build
    "hx-rank-pattern-zero": ("tenant-0", 422, r"'hx-rank-pattern-zero.*rank_pattern"),
    "hx-rank-pattern-float": ("tenant-0", 422, r"'hx-rank-pattern-float.*rank_pattern"),
    "hx-rank-pattern-huge": ("tenant-0", 422, r"'hx-rank-pattern-huge.*rank_pattern"),
    # rank_pattern says 2, the q_proj tensors are rank 4: PEFT cannot load it either
    "hx-rank-pattern-mismatch": ("tenant-0", 422, r"'hx-rank-pattern-mismatch.*rank"),
    # every stored value finite in float32 (|B| <= 3e38), but alpha/r = 2 makes the scaled B inf
    "hx-b-overflow": ("tenant-0", 422, r"'hx-b-overflow.*scal"),
    # A and B each finite and modest for float32 (~5e23), their product ~1e47 is not
    "hx-ab-overflow": ("tenant-0", 422, r"'hx-ab-overflow.*(gain|overflow|bound|exceed|finite|scal)"),
}

DTYPE_CASES: dict[str, tuple[str, int, str]] = {
    "hx-fp8": ("tenant-0", 422, r"'hx-fp8.*lora_A.*(dtype|float8)"),
    "hx-int": ("tenant-0", 422, r"'hx-int.*lora_B.*(dtype|int)"),
}

# Built from tenant-2 (q_proj and v_proj only: few modules, so the slow key's cost on a server
# that runs it stays bounded, about 4 matches).
PATTERN_CASES: dict[str, tuple[str, int, str]] = {
    "hx-redos-alpha-slow": ("tenant-2", 422, r"'hx-redos-alpha-slow.*alpha_pattern"),
    "hx-redos-alpha-nested": ("tenant-2", 422, r"'hx-redos-alpha-nested.*alpha_pattern"),
    "hx-redos-rank-nested": ("tenant-2", 422, r"'hx-redos-rank-nested.*rank_pattern"),
    "hx-redos-rank-slow": ("tenant-2", 422, r"'hx-redos-rank-slow.*rank_pattern"),
}

HOSTILE_CASES = {**OVERFLOW_CASES, **DTYPE_CASES, **PATTERN_CASES}


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    # allow_nan (the default) writes Infinity / NaN, which Python's and PEFT's json.load accept.
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _rewrite(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    save_file(fn(dict(tensors)), path / "adapter_model.safetensors")


def _map(kind: str, fn):
    """Apply ``fn`` to the lora_A or lora_B tensors only."""
    return lambda t: {k: (fn(v) if f"lora_{kind}" in k else v) for k, v in t.items()}


def make_hostile_adapters(adapters_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write every HOSTILE_CASES folder under ``out_dir`` from the demo adapters in ``adapters_dir``."""
    adapters_dir, out_dir = Path(adapters_dir), Path(out_dir)
    out: dict[str, Path] = {}
    for name, (source, _, _) in HOSTILE_CASES.items():
        dst = out_dir / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(adapters_dir / source, dst)
        out[name] = dst

    _edit_config(out["hx-alpha-huge"], lora_alpha=1e30)
    _edit_config(out["hx-alpha-pattern-inf"], alpha_pattern={"q_proj": float("inf")})
    _edit_config(out["hx-alpha-pattern-nan"], alpha_pattern={"v_proj": float("nan")})
    _edit_config(out["hx-alpha-pattern-str"], alpha_pattern={"q_proj": "1e3"})
    _edit_config(out["hx-rank-pattern-zero"], rank_pattern={"q_proj": 0})
    _edit_config(out["hx-rank-pattern-float"], rank_pattern={"q_proj": 2.5})
    _edit_config(out["hx-rank-pattern-huge"], rank_pattern={"q_proj": 10**12})
    _edit_config(out["hx-rank-pattern-mismatch"], rank_pattern={"q_proj": 2})
    _rewrite(out["hx-b-overflow"], _map("B", lambda v: v / v.abs().max() * 3.0e38))
    _rewrite(out["hx-ab-overflow"], lambda t: {k: v * 1e25 for k, v in t.items()})
    _rewrite(out["hx-fp8"], _map("A", lambda v: v.to(torch.float8_e4m3fn)))
    _rewrite(out["hx-int"], _map("B", lambda v: (v * 1000).round().to(torch.int32)))
    _edit_config(out["hx-redos-alpha-slow"], alpha_pattern={SLOW_KEY: 32})
    _edit_config(out["hx-redos-alpha-nested"], alpha_pattern={"(a+)+$": 8})
    _edit_config(out["hx-redos-rank-nested"], rank_pattern={"(x+x+)+y": 8})
    _edit_config(out["hx-redos-rank-slow"], rank_pattern={SLOW_KEY: 16})

    for name, path in out.items():  # the edits really happened (a no-op edit would test nothing)
        assert (path / "adapter_config.json").read_bytes() != (adapters_dir / HOSTILE_CASES[name][0] /
                                                               "adapter_config.json").read_bytes() or \
            (path / "adapter_model.safetensors").read_bytes() != (adapters_dir / HOSTILE_CASES[name][0] /
                                                                  "adapter_model.safetensors").read_bytes(), name
    return out


def make_pattern_adapter(good: str | Path, dst: str | Path) -> Path:
    """A legal adapter using rank_pattern and alpha_pattern the way PEFT writes them.

    From an attention+MLP adapter: layer 0's q_proj truncated to rank 2 (rank_pattern with a
    full dotted module name), a bigger alpha for every q_proj (a bare module name), and a smaller
    one for layer 1's v_proj only (a dotted suffix including ``self_attn``, which matches in PEFT
    only if the server matches the module's real path). PEFT loads it; outputs must equal PEFT's.
    """
    good, dst = Path(good), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(good, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    assert "q_proj" in cfg["target_modules"] and "v_proj" in cfg["target_modules"], cfg["target_modules"]
    assert cfg["r"] > 2
    # PEFT: the first matching key (in the config's order) wins, so the specific key goes first.
    _edit_config(
        dst,
        rank_pattern={"model.layers.0.self_attn.q_proj": 2},
        alpha_pattern={"layers.0.self_attn.q_proj": 40, "q_proj": 3 * cfg["lora_alpha"], "layers.1.self_attn.v_proj": 1},
    )

    def truncate(t):
        out = {}
        for k, v in t.items():
            if ".layers.0." in k and ".q_proj." in k:
                v = v[:2].clone() if "lora_A" in k else v[:, :2].clone()
            out[k] = v
        return out

    _rewrite(dst, truncate)
    return dst


def make_padded_adapter(good: str | Path, dst: str | Path, rank: int) -> Path:
    """``good`` zero-padded to rank ``rank`` with lora_alpha scaled to keep alpha/r: the same
    function as ``good`` (PEFT's output is identical), in a file ~rank/r times larger."""
    good, dst = Path(good), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(good, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    r = cfg["r"]
    assert rank > r and not cfg.get("use_rslora") and not cfg.get("rank_pattern")
    _edit_config(dst, r=rank, lora_alpha=cfg["lora_alpha"] * rank / r)

    def pad(t):
        out = {}
        for k, v in t.items():
            if "lora_A" in k:
                v = torch.cat([v, torch.zeros(rank - v.shape[0], v.shape[1], dtype=v.dtype)], dim=0)
            else:
                v = torch.cat([v, torch.zeros(v.shape[0], rank - v.shape[1], dtype=v.dtype)], dim=1)
            out[k] = v.contiguous()
        return out

    _rewrite(dst, pad)
    return dst
