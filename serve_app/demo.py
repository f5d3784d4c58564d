"""Offline demo assets: a tiny Llama base model, its tokenizer and N tenant LoRA adapters.

Everything here is built from nothing -- no model hub, no network -- and deterministically:
the same parameters give byte-identical weights, so tests, benchmarks and the demo server
config can all point at the same cache folder and agree on what they are serving.

The defaults are the shared workload W1: Llama architecture, hidden 256, intermediate 688,
4 layers, 4 attention heads (4 KV heads), vocab 8192, fp32; LoRA on q/k/v/o_proj with
rank 8 for even tenants and 16 for odd ones (mixed ranks exercise the batched LoRA path).

Layout of one build (``root`` is ``<out_dir>/<shape>-<hash>``)::

    root/
      demo-base/            HF model folder: config.json, model.safetensors, tokenizer files
      adapters/tenant-0/    standard PEFT folder: adapter_config.json, adapter_model.safetensors
      adapters/tenant-1/
      ...
      .complete             written last; its presence is what makes a folder a cache hit

Usage::

    from serve_app.demo import build_demo_assets
    assets = build_demo_assets()            # cached under $SERVE_APP_DEMO_DIR or ~/.cache
    assets.base, assets.adapter_path("tenant-3")

or from a shell: ``python -m serve_app.demo --out /tmp/demo --num-adapters 8``.
"""

from __future__ import annotations

import argparse
import copy
import errno
import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# torch, transformers, peft and tokenizers are imported inside the builders: a cache hit -- the
# common case at server start and in every test after the first -- then costs no heavy imports.

logger = logging.getLogger(__name__)

# Bump when the recipe changes in a way that changes the bytes on disk, so stale caches
# built by older code are never mistaken for current ones.
_RECIPE_VERSION = 1

BASE_DIRNAME = "demo-base"
ADAPTERS_DIRNAME = "adapters"
MARKER = ".complete"
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, the Llama convention for 0..2

# Roughly this many characters of synthetic text are used to train the BPE: enough to fill an
# 8k vocab with merges, small enough that training takes well under a second.
_TRAIN_CHARS = 400_000


@dataclass(frozen=True)
class DemoAssets:
    """Where one build lives. ``base`` is loadable with ``from_pretrained``; each adapter is
    ``adapters_dir / adapter_id`` and loadable with ``PeftModel.from_pretrained``."""

    root: Path
    base: Path
    adapters_dir: Path
    adapter_ids: list[str] = field(default_factory=list)

    def adapter_path(self, adapter_id: str) -> Path:
        return self.adapters_dir / adapter_id


def default_out_dir() -> Path:
    return Path(os.environ.get("SERVE_APP_DEMO_DIR") or "~/.cache/serve_app/demo").expanduser()


def build_demo_assets(
    out_dir: str | Path | None = None,
    *,
    num_adapters: int = 8,
    hidden_size: int = 256,
    intermediate_size: int = 688,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    vocab_size: int = 8192,
    ranks: list[int] | None = None,
    target_modules: list[list[str]] | None = None,
    seed: int = 0,
    chat_template: str | None = None,
    force: bool = False,
) -> DemoAssets:
    """Build (or reuse from cache) a tiny Llama base + tokenizer + ``num_adapters`` LoRAs.

    ``ranks`` and ``target_modules`` are per-adapter lists, cycled when shorter than
    ``num_adapters``; by default rank is 8 for even adapters and 16 for odd ones, on
    q/k/v/o_proj. ``lora_alpha`` is always ``2 * r``. ``force`` rebuilds even on a cache hit.

    The vocab is exactly ``vocab_size`` up to about 18k; beyond that the synthetic training
    text runs out of merges and the model's vocab is set to the tokenizer's real size.
    """
    if num_adapters < 0:
        raise ValueError(f"num_adapters must be >= 0, got {num_adapters}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads} don't divide")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        # Byte-level BPE needs all 256 bytes in the vocab before it can learn any merge.
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    if ranks is not None and (not ranks or any(r <= 0 for r in ranks)):
        raise ValueError(f"ranks must be a non-empty list of positive ints, got {ranks}")
    if target_modules is not None and (not target_modules or not all(target_modules)):
        raise ValueError(f"target_modules must be a non-empty list of non-empty lists, got {target_modules}")

    adapter_specs = [
        {
            "id": f"tenant-{i}",
            "r": ranks[i % len(ranks)] if ranks else (8 if i % 2 == 0 else 16),
            "target_modules": list(target_modules[i % len(target_modules)] if target_modules else DEFAULT_TARGET_MODULES),
        }
        for i in range(num_adapters)
    ]
    # The cache key covers everything that changes the bytes; resolved specs rather than the
    # raw arguments, so ranks=None and ranks=[8, 16] share one folder.
    params: dict[str, Any] = {
        "recipe": _RECIPE_VERSION,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "vocab_size": vocab_size,
        "seed": seed,
        "chat_template": chat_template,
        "adapters": adapter_specs,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    name = f"llama-h{hidden_size}-l{num_layers}-v{vocab_size}-a{num_adapters}-{digest}"

    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir()
    final = out / name
    assets = DemoAssets(
        root=final,
        base=final / BASE_DIRNAME,
        adapters_dir=final / ADAPTERS_DIRNAME,
        adapter_ids=[s["id"] for s in adapter_specs],
    )
    if not force and (final / MARKER).exists():
        logger.debug("demo assets cache hit: %s", final)
        return assets

    out.mkdir(parents=True, exist_ok=True)
    # Build in a private temp folder on the same filesystem, then rename it into place in one
    # atomic step: concurrent builders (pytest workers, Ray replicas) either see no folder or a
    # complete one, never a half-written one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out))
    try:
        t0 = time.perf_counter()
        _build_into(tmp, params)
        (tmp / MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        # mkdtemp (and safetensors' writer) leave owner-only modes; the cache may be shared.
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        logger.info("built demo assets in %.1fs: %s", time.perf_counter() - t0, final)
        _publish(tmp, final, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return assets


def _publish(tmp: Path, final: Path, *, replace: bool) -> None:
    """Rename ``tmp`` to ``final``. If another builder got there first, keep the winner."""
    trash = None
    # A forced rebuild, or a folder without a marker (left by hand, or by older code), must be
    # moved aside first: rename refuses to replace a non-empty directory.
    if final.exists() and (replace or not (final / MARKER).exists()):
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(final, trash)
        except FileNotFoundError:  # someone else moved it aside concurrently
            trash = None
    try:
        os.rename(tmp, final)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (final / MARKER).exists():
            raise
        logger.debug("lost the race to publish %s; using the winner's build", final)
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _build_into(root: Path, params: dict[str, Any]) -> None:
    base_dir = root / BASE_DIRNAME
    tokenizer = build_tokenizer(params["vocab_size"], seed=params["seed"], chat_template=params["chat_template"])
    tokenizer.save_pretrained(base_dir)
    # transformers 5 records its new "TokenizersBackend" class, which 4.x cannot load; the
    # 4.x name loads in both (5.x maps it to the same backend).
    tok_cfg_path = base_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")

    model = build_base_model(
        vocab_size=len(tokenizer),  # under the request only if training ran out of merges
        hidden_size=params["hidden_size"],
        intermediate_size=params["intermediate_size"],
        num_layers=params["num_layers"],
        num_heads=params["num_heads"],
        num_kv_heads=params["num_kv_heads"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=params["seed"],
    )
    model.save_pretrained(base_dir)  # safetensors is the only/default format

    for i, spec in enumerate(params["adapters"]):
        build_adapter(
            model,
            root / ADAPTERS_DIRNAME / spec["id"],
            r=spec["r"],
            target_modules=spec["target_modules"],
            seed=params["seed"] * 1000 + i + 1,
        )


# --------------------------------------------------------------------------------------------
# tokenizer


_WORDS = (
    "the of and to in is was that for on with as by at from it this be are have not or an "
    "which one all were they but had their there been has more when will would who so no "
    "time model server request tenant adapter token batch queue latency memory kernel layer "
    "weight rank prompt answer question stream cache router replica cluster request response "
    "data value system people water world house night light story place small large quick "
    "brown fox jumps over lazy dog river mountain city garden music paper window morning "
    "learn write read think build serve run stop start open close first last next good new"
).split()
# Multibyte text, so the vocab holds some merged non-ASCII tokens while rarer characters stay
# split into byte tokens -- the case that breaks naive incremental detokenization.
_NON_ASCII = (
    "café naïve résumé über façade jalapeño crème brûlée Straße smörgåsbord "
    "日本語 東京 こんにちは 世界 中文 한국어 Привет мир Ελληνικά العربية "
    "🙂 🚀 👍🏽 — … € £ ° ±"
).split()
_ONSETS = "b c d f g h j k l m n p r s t v w z br ch cl dr fl gr pl pr sh st th tr".split()
_NUCLEI = "a e i o u ai ea ee ia io oo ou".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "x"]


def synthetic_text(seed: int = 0, num_chars: int = _TRAIN_CHARS) -> list[str]:
    """Deterministic, vaguely language-shaped lines: Zipf-distributed words from a fixed list
    plus a few thousand made-up ones, numbers, punctuation and some non-ASCII."""
    rng = random.Random(seed)
    # Made-up words give BPE enough distinct material to fill a vocab of several thousand.
    invented = sorted(
        {
            "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(rng.randint(1, 4)))
            for _ in range(6000)
        }
    )
    rng.shuffle(invented)
    lexicon = _WORDS + invented
    # Zipf: a few words dominate, like real text. Cumulative once, or choices() redoes it per call.
    cum_weights = list(itertools.accumulate(1.0 / (k + 1) for k in range(len(lexicon))))

    lines: list[str] = []
    total = 0
    while total < num_chars:
        words = rng.choices(lexicon, cum_weights=cum_weights, k=rng.randint(4, 18))
        for j in range(len(words)):
            roll = rng.random()
            if roll < 0.04:
                words[j] = rng.choice(_NON_ASCII)
            elif roll < 0.07:
                words[j] = str(rng.randint(0, 10 ** rng.randint(1, 5)))
            elif roll < 0.10:
                words[j] = words[j].capitalize()
        line = " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!", ",", ":"])
        lines.append(line)
        total += len(line) + 1
    return lines


def build_tokenizer(vocab_size: int, *, seed: int = 0, chat_template: str | None = None):
    """Train a byte-level BPE on synthetic text and wrap it as a ``PreTrainedTokenizerFast``
    that, like Llama's, prepends ``<s>`` when encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols up front: any UTF-8 input encodes, nothing ever maps to <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_text(seed), trainer=trainer)

    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,  # would rewrite " ." to "." and break round-trips
        model_max_length=2048,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# --------------------------------------------------------------------------------------------
# base model and adapters


def build_base_model(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    seed: int = 0,
):
    """A randomly initialised fp32 ``LlamaForCausalLM``.

    Weights are N(0, 1/sqrt(hidden_size)) instead of the usual N(0, 0.02): at 0.02 a model this
    small is nearly flat, and greedy decoding collapses into a one- or two-token loop within a
    few steps, which hides bugs in sampling, stop handling and streaming. Unit-gain layers give
    varied (if meaningless) text.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=hidden_size**-0.5,
        tie_word_embeddings=False,  # separate lm_head, like the Llama models the server targets
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    return model


def build_adapter(base, path: Path, *, r: int, target_modules: list[str], seed: int) -> None:
    """Save one PEFT LoRA adapter for ``base`` at ``path``. ``base`` is left untouched."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(target_modules),
        # False = A and B both get nn.Linear's default init instead of B = 0, so the adapter
        # changes outputs from the start (the usual init makes every adapter a no-op).
        init_lora_weights=False,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    # A fresh module tree per adapter: get_peft_model injects LoRA layers in place, and stacking
    # tenants on one tree would leak earlier adapters into later ones. The tensors themselves
    # are shared, not cloned -- only LoRA weights are saved, and cloning the base per adapter
    # was most of the build time.
    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    fresh = copy.deepcopy(base, memo=shared)
    torch.manual_seed(seed)
    peft_model = get_peft_model(fresh, cfg)
    # A stable name instead of whatever path (or nothing) the in-memory base carries.
    saved_cfg = peft_model.peft_config["default"]
    saved_cfg.base_model_name_or_path = BASE_DIRNAME
    # PEFT keeps target_modules as a set, whose JSON order follows the per-process string hash
    # seed; the caller's list keeps adapter_config.json byte-identical across builds.
    saved_cfg.target_modules = list(target_modules)
    # No embedding layers are adapted; "auto" would try to fetch the base's config from the hub.
    peft_model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="serve-app-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"cache folder (default: {default_out_dir()})")
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    assets = build_demo_assets(args.out, num_adapters=args.num_adapters, force=args.force)
    print(f"root:         {assets.root}")
    print(f"base:         {assets.base}")
    print(f"adapters_dir: {assets.adapters_dir}")
    print(f"adapter_ids:  {','.join(assets.adapter_ids)}")


if __name__ == "__main__":
    main()
