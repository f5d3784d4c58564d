"""Structured output (response_format json_object / json_schema): outputs parse and validate,
constrained rows share a batch with free rows (which stay bit-identical) and adapters, greedy
constrained decoding equals a plain-transformers / PEFT loop masked by the same grammar, bad
schemas are 400s, compiled grammars are cached, and the matcher survives a re-run."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from serve_app.api.protocol import ChatCompletionRequest, CompletionRequest
from serve_app.api.sampling_params import SamplingParams
from serve_app.api.structured import JSON_OBJECT_SCHEMA, schema_text
from serve_app.engine.structured import RowGrammar, apply_bitmask
from serve_app.errors import InvalidRequestError
from tests.helpers import peft_model, reference_steps

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "ok"],
    "additionalProperties": False,
}
TEXT = schema_text(SCHEMA, "test")


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_json_schema_rows_validate_beside_free_rows_and_adapters(two_adapter_engine, tiny_assets):
    eng = two_adapter_engine
    a0, a1 = tiny_assets.adapter_ids[:2]
    free = [("the river bank", _greedy(24), ad) for ad in (None, a0, a1)]
    alone = eng.generate_batch(free)
    constrained = []
    for j, ad in enumerate((None, a0, a1)):
        constrained += [
            (f"hello {j}", SamplingParams(max_tokens=200, temperature=0.0, json_schema=TEXT), ad),
            (f"hello {j}", SamplingParams(max_tokens=200, temperature=1.0, seed=7 + j, json_schema=TEXT), ad),
            # ignore_eos: the grammar still ends the row when the document is complete.
            (f"hi {j}", SamplingParams(max_tokens=200, temperature=0.8, seed=j, ignore_eos=True, json_schema=TEXT), ad),
            # min_tokens does not hold EOS back on a constrained row (it would leave no token).
            (f"hi {j}", SamplingParams(max_tokens=200, temperature=0.0, min_tokens=150, json_schema=TEXT), ad),
        ]
    mixed = eng.generate_batch(free + constrained)
    for a, b in zip(alone, mixed[: len(free)]):
        assert a.token_ids == b.token_ids  # the free rows are untouched by the masks beside them
    for c in mixed[len(free):]:
        assert c.finish_reason == "stop", c
        doc = json.loads(c.text)
        jsonschema.validate(doc, SCHEMA)
    # Seeded constrained rows are reproducible.
    again = eng.generate_batch(constrained[1:2])
    assert again[0].token_ids == mixed[len(free) + 1].token_ids


def test_json_object_rows_parse_as_objects(two_adapter_engine, tiny_assets):
    eng = two_adapter_engine
    # A random model's free-form object may never close its first key: lean towards closing.
    close = {eng.tokenizer.convert_tokens_to_ids(t): 4.0 for t in ('"', "}")}
    reqs = [(f"x {i}", SamplingParams(max_tokens=400, temperature=0.0, json_schema=JSON_OBJECT_SCHEMA,
                                      logit_bias=close), ad)
            for i, ad in enumerate([None, *tiny_assets.adapter_ids[:2]])]
    reqs += [(f"x {i}", SamplingParams(max_tokens=400, temperature=1.0, seed=i, json_schema=JSON_OBJECT_SCHEMA,
                                       logit_bias=close), ad)
             for i, ad in enumerate([None, *tiny_assets.adapter_ids[:2]])]
    docs = []
    for c in eng.generate_batch(reqs):
        assert c.finish_reason == "stop", c
        docs.append(json.loads(c.text))
        assert isinstance(docs[-1], dict), c.text
    assert sum(len(d) for d in docs) >= 3, docs  # not just "{}"


class GrammarProcessor(LogitsProcessor):
    """The reference: the same schema's grammar (a separate xgrammar matcher) as a transformers
    logits processor, masking disallowed tokens to -inf."""

    def __init__(self, eng, prompt_len: int, schema: str):
        import xgrammar as xgr

        self.xgr = xgr
        self.matcher = xgr.GrammarMatcher(eng.grammars().compiled(schema))
        self.prompt_len = prompt_len
        self.mask = xgr.allocate_token_bitmask(1, eng.vocab_size)
        self.json_ok = eng.grammars()._json_ok

    def __call__(self, input_ids, scores):
        out = input_ids[0, self.prompt_len:].tolist()
        if out:
            assert self.matcher.accept_token(out[-1])
        self.matcher.fill_next_token_bitmask(self.mask, 0)
        self.mask &= self.json_ok  # the engine's one addition to xgrammar's mask: no raw control characters
        scores = scores.clone()
        self.xgr.apply_token_bitmask_inplace(scores, self.mask)
        return scores


def test_greedy_constrained_rows_equal_a_peft_loop_masked_by_the_same_grammar(two_adapter_engine, tiny_assets):
    eng = two_adapter_engine
    a0, a1 = tiny_assets.adapter_ids[:2]
    prompt = eng.tokenize("tenant adapter token")
    ads = [None, a0, a1]
    outs = eng.generate_batch([(prompt, SamplingParams(max_tokens=120, temperature=0.0, json_schema=TEXT), ad)
                               for ad in ads] + [(prompt, _greedy(10), a0)])
    for ad, c in zip(ads, outs):
        model = peft_model(tiny_assets.base, None if ad is None else tiny_assets.adapters_dir / ad)
        steps = reference_steps(model, prompt, 120, LogitsProcessorList([GrammarProcessor(eng, len(prompt), TEXT)]),
                                stops=eng.eos_ids)
        assert c.token_ids == [t for t, _ in steps], ad
        assert steps[-1][0] in eng.eos_ids and c.finish_reason == "stop"


def test_a_schema_the_compiler_refuses_is_a_400_at_submit_and_grammars_are_cached(two_adapter_engine):
    eng = two_adapter_engine
    bad = schema_text({"$ref": "#/$defs/nope"}, "t")  # a valid JSON Schema; a reference to nothing
    with pytest.raises(InvalidRequestError, match="response_format: the JSON schema cannot be used") as e:
        eng.add_request("x", SamplingParams(max_tokens=4, json_schema=bad), None, lambda out: None)
    assert "nope" in e.value.message and ".cc" not in e.value.message  # xgrammar's reason, not its source path
    assert eng.stats()["running"] == 0 and eng.stats()["waiting"] == 0
    cache = eng.grammars()
    s = schema_text({"type": "object", "properties": {"k": {"type": "integer"}}}, "t")
    before = cache.compiles
    a = cache.compiled(s)
    assert cache.compiles == before + 1 and cache.compiled(s) is a and cache.compiles == before + 1


def test_the_matcher_survives_a_rerun_of_its_request(two_adapter_engine):
    """A preempted request keeps its output_ids and is recomputed: the grammar state lives on the
    request, and ``sync`` replays the output into a reset matcher when the count disagrees."""
    eng = two_adapter_engine
    cache = eng.grammars()
    doc = json.dumps({"name": "ab", "age": 3, "role": "user", "tags": ["x"], "ok": True})
    ids = eng.tokenizer(doc, add_special_tokens=False)["input_ids"]
    live = cache.row(TEXT)
    V = eng.vocab_size
    for k, t in enumerate(ids):
        out = ids[:k]
        la, lb, lc = (torch.zeros(1, V) for _ in range(3))
        cache.mask_rows(la, [(0, live, out)])
        rerun = cache.row(TEXT)  # a matcher that saw none of it
        cache.mask_rows(lb, [(0, rerun, out)])
        stale = cache.row(TEXT)  # one that consumed more than the output now holds
        for u in ids[: k + 2]:
            stale.accept(u)
        cache.mask_rows(lc, [(0, stale, out)])
        assert torch.equal(la, lb) and torch.equal(la, lc), k
        assert la[0, t] == 0  # the document's next token is allowed
        assert live.accept(t)
    assert live.accept(sorted(eng.eos_ids)[0]) and live.terminated


def test_apply_bitmask_equals_xgrammars_kernel():
    import xgrammar as xgr

    g = torch.Generator().manual_seed(0)
    for vocab in (512, 8192, 49152, 1000):
        logits = torch.randn(6, vocab, generator=g)
        mask = torch.randint(-(2**31), 2**31 - 1, (6, (vocab + 31) // 32), dtype=torch.int32, generator=g)
        ours, ref = logits.clone(), logits.clone()
        apply_bitmask(ours, torch.tensor([1, 4]), mask[[1, 4]])
        xgr.apply_token_bitmask_inplace(ref, mask, vocab_size=vocab, indices=[1, 4])
        assert torch.equal(ours, ref)
        assert torch.equal(ours[[0, 2, 3, 5]], logits[[0, 2, 3, 5]])


@pytest.mark.parametrize("cls,base", [(CompletionRequest, {"prompt": "x"}), (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]})])
def test_request_forms_become_one_schema_text(cls, base):
    def params(**kw):
        return cls.model_validate({"model": "m", **base, **kw}).to_sampling_params(16).json_schema

    assert params() is None and params(response_format={"type": "text"}) is None
    assert params(response_format={"type": "json_object"}) == JSON_OBJECT_SCHEMA
    rf = {"type": "json_schema", "json_schema": {"name": "P", "schema": SCHEMA, "strict": True}}
    assert params(response_format=rf) == TEXT
    assert params(guided_json=SCHEMA) == TEXT == params(guided_json=json.dumps(SCHEMA))
    assert params(structured_outputs={"json": SCHEMA}) == TEXT
    assert json.loads(TEXT) == SCHEMA and list(json.loads(TEXT)["properties"]) == list(SCHEMA["properties"])  # order kept
    for bad in ({"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}},
                {"type": "yaml"}, "json"):
        with pytest.raises(Exception) as e:
            cls.model_validate({"model": "m", **base, "response_format": bad})
        assert type(e.value).__name__ == "ValidationError"


@pytest.mark.smollm2
def test_json_schema_on_the_real_model_per_tenant():
    """SmolLM2-135M-Instruct (vocab 49152, real BPE) and its trained tenants, chat-templated:
    every output parses and validates; a free row in the same batch keeps its tokens."""
    from serve_app.api.chat import chat_prompt_ids
    from serve_app.engine.config import EngineConfig
    from serve_app.engine.engine import LoRAEngine
    from tests.helpers import smollm2_assets

    assets = smollm2_assets()
    eng = LoRAEngine(EngineConfig(model=str(assets.base), max_lora_rank=64, max_num_seqs=8))
    try:
        for aid in assets.adapter_ids:
            eng.load_adapter(aid, str(assets.adapters_dir / aid))
        prompt = chat_prompt_ids(eng.tokenizer, [{"role": "user", "content": "Describe a person as JSON."}])
        free = (prompt, _greedy(16), assets.adapter_ids[0])
        alone = eng.generate_batch([free])[0]
        reqs = [(prompt, SamplingParams(max_tokens=120, temperature=t, seed=1, json_schema=TEXT), ad)
                for ad in [None, *assets.adapter_ids] for t in (0.0, 0.9)]
        outs = eng.generate_batch([free, *reqs])
        assert outs[0].token_ids == alone.token_ids
        for c in outs[1:]:
            assert c.finish_reason == "stop", c
            jsonschema.validate(json.loads(c.text), SCHEMA)
    finally:
        eng.shutdown()


def test_compile_grammar_runs_off_the_event_loop(two_adapter_engine):
    """A schema's compile (20-130 ms) must not hold the event loop that serves every other request:
    the deployments await engine.compile_grammar before submit. A ticker on the loop keeps ticking
    through the compile, and submit then finds the schema compiled (no second compile)."""
    import asyncio
    import time

    eng = two_adapter_engine
    item = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "number"}},
                                             "b": {"enum": [f"v{j}" for j in range(20)]}}, "required": ["a", "b"]}
    schema = json.dumps({"type": "object", "properties": {f"k{i}": item for i in range(200)},
                         "required": [f"k{i}" for i in range(0, 200, 2)]})

    async def run():
        gaps, stop = [], False

        async def ticker():
            last = time.perf_counter()
            while not stop:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        await eng.compile_grammar(schema)
        took = time.perf_counter() - t0
        stop = True
        await t
        return took, max(gaps)

    before = eng.grammars().compiles
    took, worst_gap = asyncio.run(run())
    assert eng.grammars().compiles == before + 1 and eng.grammars().has(schema)
    assert took > 0.01, f"precondition: the compile took {took * 1e3:.1f} ms (too quick to tell)"
    assert worst_gap < took / 2, f"the loop stalled {worst_gap * 1e3:.1f} ms of a {took * 1e3:.1f} ms compile"
    out = eng.generate_batch([([1, 5, 9], SamplingParams(max_tokens=4, temperature=0.0, json_schema=schema), None)])
    assert out[0].token_ids and eng.grammars().compiles == before + 1, "submit compiled it again"


# ---- complexity bounds at the edge (api/structured.py) ------------------------------------------

def _refusal(schema) -> str:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "response_format": {
            "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    return str(e.value)


def _string(pattern: str) -> dict:
    return {"type": "object", "properties": {"x": {"type": "string", "pattern": pattern}}, "required": ["x"]}


def test_nested_bounded_repetition_is_refused_at_the_edge():
    """The 46-character pattern that takes seconds to minutes to compile (nested {1,n} bounds
    multiply into states) is a 400 naming the expansion and the limit, wherever a regex sits."""
    slow = "^(([a-z0-9]{1,36}-){1,36}[a-z]{1,36}\\.){1,36}$"
    for schema, where in ((_string(slow), "properties/x/pattern"),
                          ({"type": "object", "patternProperties": {slow: {"type": "integer"}}}, "patternProperties/"),
                          ({"type": "object", "propertyNames": {"pattern": slow}}, "propertyNames/pattern"),
                          ({"type": "array", "items": _string("^([a-z]{1,36}-){1,36}$")}, "items/properties/x/pattern")):
        msg = _refusal(schema)
        assert "expand to" in msg and "more than 256" in msg and where in msg, msg
    # Spread over several patterns: the budget is the schema's.
    spread = {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": "^([a-z]{1,12}-){1,12}$"}
                                               for i in range(3)}}
    assert "more than 256" in _refusal(spread)


@pytest.mark.parametrize("pattern,expect", [
    ("^[a-z]{1,5000}$", "repeats something 5000 times, more than 1000"),
    ("^(a{2000,})$", "repeats something 2000 times, more than 1000"),
    ("^((((a+)+)+)+)$", "nests repetitions 4 deep, more than 3"),
    ("(" * 40 + "a" + ")" * 40, "nested deeper than 32"),
])
def test_regex_bounds_are_refused_at_the_edge(pattern, expect):
    assert expect in _refusal(_string(pattern))


def test_deep_schemas_are_a_400_not_a_recursion_error():
    deep: dict = {"type": "integer"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    assert "nested deeper than 64 levels" in _refusal(deep)
    with pytest.raises(Exception) as e:  # JSON text nested past Python's recursion limit
        schema_text('{"a":' * 5000 + "1" + "}" * 5000, "guided_json")
    assert type(e.value).__name__ == "PydanticCustomError" and "nested deeper" in str(e.value)
    very: dict = {}
    cur = very
    for _ in range(3000):
        cur["a"] = {}
        cur = cur["a"]
    with pytest.raises(Exception) as e:
        schema_text(very, "guided_json")
    assert type(e.value).__name__ == "PydanticCustomError" and "nested deeper" in str(e.value)


def test_everyday_patterns_pass_the_edge():
    """UUIDs, IPv4, hostnames, e-mails, dates, semver, phone numbers, long flat bounds, a property
    named "pattern", a "pattern" inside an enum value: none refused."""
    for p in ("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
              "^((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])$",
              "^(\\d{1,3}\\.){3}\\d{1,3}$", "^([0-9A-Fa-f]{2}[:-]){5}([0-9A-Fa-f]{2})$",
              "^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\\.)+[a-zA-Z]{2,63}$",
              "^[a-z0-9._%+-]+@[a-z0-9.-]+\\.[a-z]{2,}$", "^\\d{4}-\\d{2}-\\d{2}$",
              "^v?(0|[1-9]\\d*)\\.(0|[1-9]\\d*)\\.(0|[1-9]\\d*)(-[0-9A-Za-z-]+(\\.[0-9A-Za-z-]+)*)?$",
              "^(?:\\+?1[-. ]?)?\\(?([0-9]{3})\\)?[-. ]?([0-9]{3})[-. ]?([0-9]{4})$", "^[\\s\\S]{0,1000}$"):
        schema_text(_string(p), "t")
    schema_text({"type": "object", "properties": {"pattern": {"type": "string"}}}, "t")
    schema_text({"enum": [{"pattern": "((((a+)+)+)+)"}]}, "t")
    schema_text(SCHEMA, "t")
    nested: dict = {"type": "string"}
    for _ in range(12):  # deeper than OpenAI's 10 levels
        nested = {"type": "object", "properties": {"a": {"type": "array", "items": nested}, "b": {"type": "integer"}}}
    schema_text(nested, "t")
