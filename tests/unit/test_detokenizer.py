"""Incremental detokenization and stop strings, against non-streamed references.

The tokenizers are trained here, offline, on text with multi-byte characters so
that some characters really are split over several tokens (asserted below).
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from serve_app.engine.detokenizer import (
    MAX_PENDING_TOKENS,
    PROMPT_CONTEXT_TOKENS,
    IncrementalDetokenizer,
    StopChecker,
    TextAssembler,
)

SAMPLE = "café 日本語 🙂 naïve"
WORDS = (
    "the quick brown fox jumps over lazy dog café 日本語 🙂 naïve hello world "
    "stop token streaming über 한국어 Привет 🎉🎉 , ."
).split()


def _corpus(seed: int = 0, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE; a small vocab leaves multi-byte chars split
    (é and CJK into single bytes, 🙂 into a 2-byte merge plus two bytes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    """Llama style: "▁" metaspace BPE with byte fallback and a leading-space strip."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    # Train on ASCII only so every non-ASCII character falls back to byte tokens.
    ascii_lines = [line.encode("ascii", "ignore").decode() for line in _corpus()]
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(ascii_lines, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) for m in model["merges"]]
    tok.model = models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(params=["byte_level", "sentencepiece"])
def tokenizer(request) -> PreTrainedTokenizerFast:
    return request.getfixturevalue(request.param)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], str]:
    deltas = [detok.add_token(i) for i in ids]
    return deltas, detok.flush()


def _continuation(tok, prompt: list[int], generated: list[int], skip: bool = True) -> str:
    """Non-streamed text of `generated` as a continuation of the prompt."""

    def dec(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    full, head = dec(prompt + generated), dec(prompt)
    assert full.startswith(head)
    return full[len(head) :]


# --- IncrementalDetokenizer -------------------------------------------------


def test_fixtures_split_multibyte_characters(tokenizer):
    # Without split characters the tests below would prove nothing.
    ids = tokenizer.encode(SAMPLE, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert sum("\ufffd" in p for p in pieces) >= 4, pieces
    assert tokenizer.decode(ids) == SAMPLE


def test_partial_character_is_held_back(tokenizer):
    ids = tokenizer.encode("日", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.add_token(i) for i in ids] == [""] * (len(ids) - 1) + ["日"]
    assert detok.flush() == ""


@pytest.mark.parametrize("prompt_text", ["", "hello", "the quick brown fox over 日本語 🙂"])
def test_stream_equals_non_streamed_decode(tokenizer, prompt_text):
    prompt = tokenizer.encode(prompt_text) if prompt_text else []
    for line in _corpus(seed=1, n=60):
        generated = tokenizer.encode(" " + line, add_special_tokens=False)
        deltas, tail = _stream(IncrementalDetokenizer(tokenizer, prompt), generated)
        assert "".join(deltas) + tail == _continuation(tokenizer, prompt, generated)
        assert all("\ufffd" not in d for d in deltas)  # the corpus is valid UTF-8
        if not prompt:
            assert "".join(deltas) + tail == tokenizer.decode(generated)


def test_sentencepiece_first_token_keeps_leading_space_after_prompt(sentencepiece):
    prompt = sentencepiece.encode("hello")
    generated = sentencepiece.encode(" world", add_special_tokens=False)
    assert sentencepiece.convert_ids_to_tokens(generated)[0].startswith("▁")
    deltas, tail = _stream(IncrementalDetokenizer(sentencepiece, prompt), generated)
    assert "".join(deltas) + tail == " world"  # decode(generated) alone drops the space
    # Without a prompt there is nothing to separate from: same as decode().
    deltas, tail = _stream(IncrementalDetokenizer(sentencepiece, []), generated)
    assert "".join(deltas) + tail == "world" == sentencepiece.decode(generated)


@pytest.mark.parametrize("skip", [True, False])
def test_random_byte_level_ids_with_special_tokens(byte_level, skip):
    # Arbitrary ids produce invalid and truncated UTF-8 and stray special tokens;
    # byte-level decoding is prefix-stable, so the invariant must still hold.
    rng = random.Random(7)
    specials = byte_level.all_special_ids
    for _ in range(200):
        generated = [
            rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(byte_level))
            for _ in range(rng.randint(1, 40))
        ]
        # A prompt of whole characters, so the continuation is decode(generated).
        prompt = byte_level.encode(rng.choice(["", "hi", "日本 🙂"]))
        detok = IncrementalDetokenizer(byte_level, prompt, skip_special_tokens=skip)
        deltas, tail = _stream(detok, generated)
        assert "".join(deltas) + tail == byte_level.decode(generated, skip_special_tokens=skip)
        assert detok.token_ids == generated


def test_special_tokens_skipped_or_kept(byte_level):
    ids = byte_level.encode("hello world", add_special_tokens=False) + [byte_level.eos_token_id]
    assert "".join(_stream(IncrementalDetokenizer(byte_level, [], True), ids)[0]) == "hello world"
    kept = "".join(_stream(IncrementalDetokenizer(byte_level, [], False), ids)[0])
    assert kept == "hello world</s>"


def test_decode_window_stays_small(tokenizer):
    # Cost per token must not grow with the output: every decode sees a few ids.
    sizes: list[int] = []

    class Spy:
        all_special_ids = tokenizer.all_special_ids

        def decode(self, ids, **kwargs):
            sizes.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    prompt = tokenizer.encode(" ".join(_corpus(seed=2, n=20)))
    generated = tokenizer.encode(" ".join(_corpus(seed=3, n=100)), add_special_tokens=False)
    generated += [tokenizer.eos_token_id] * 200  # skipped ids must not widen the window
    assert len(generated) > 1000
    deltas, tail = _stream(IncrementalDetokenizer(Spy(), prompt), generated)
    assert "".join(deltas) + tail == _continuation(tokenizer, prompt, generated)
    assert max(sizes) <= PROMPT_CONTEXT_TOKENS + 8
    assert len(sizes) <= 2 * len(generated) + 1


class DecodeSpy:
    """The tokenizer, counting what every decode call is given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.all_special_ids = tokenizer.all_special_ids
        self.sizes: list[int] = []

    def decode(self, ids, **kwargs):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what byte-level BPE vocabularies spell bytes with)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + len(out) - len(printable))
    return out


def _byte_token(tok, byte: int) -> int:
    """The id of the token that is exactly one byte (byte-level or sentencepiece byte fallback)."""
    fallback = f"<0x{byte:02X}>"
    token = fallback if fallback in tok.get_vocab() else _byte_to_char()[byte]
    return tok.get_vocab()[token]


# Invalid UTF-8 must not make a token's cost grow with the output (issue 25): with logit_bias
# forcing a lone continuation byte, every token re-decoded the whole output (4,096 tokens:
# 1.7 s on the engine thread). The bound: every decode sees at most the prompt context plus
# twice MAX_PENDING_TOKENS ids, two decodes per token.
WINDOW_BOUND = PROMPT_CONTEXT_TOKENS + 2 * MAX_PENDING_TOKENS


@pytest.mark.parametrize("prompt_text", ["", "hello 日本"])
def test_lone_continuation_bytes_decode_in_linear_time(tokenizer, prompt_text):
    """Rule: the stream equals decode(generated) exactly, every U+FFFD where the decoder puts it
    (byte-level: one per stray byte; byte fallback: one per byte of an invalid byte run), and
    it flows: at most MAX_PENDING_TOKENS + 3 trailing U+FFFD are held back at any point."""
    n = 4096
    cont = _byte_token(tokenizer, 0x80)
    assert tokenizer.decode([cont]) == "\ufffd"
    prompt = tokenizer.encode(prompt_text) if prompt_text else []
    spy = DecodeSpy(tokenizer)
    asm = TextAssembler(spy, prompt)
    emitted = ""
    for i in range(n):
        emitted += asm.add_token(cont)[0]
        assert len(emitted) >= i + 1 - (MAX_PENDING_TOKENS + 3), f"token {i}: the stream stalled"
    emitted += asm.finish()
    assert emitted == asm.text == tokenizer.decode([cont] * n) == "\ufffd" * n
    assert max(spy.sizes) <= WINDOW_BOUND and len(spy.sizes) <= 2 * n + 2
    # The per-token work bound, as decode input: was n^2 / 2 = 8.4M ids for 4,096 tokens.
    assert sum(spy.sizes) <= 2 * WINDOW_BOUND * n


@pytest.mark.parametrize("seed", range(4))
def test_invalid_utf8_mixed_with_characters_equals_decode(byte_level, seed):
    """Byte-level decoding is prefix-stable on invalid UTF-8 (one U+FFFD per maximal invalid
    run, one for a truncated tail), so the forced advances keep the stream exactly equal to
    decode(): stray continuation and lead bytes between split multi-byte characters."""
    rng = random.Random(seed)
    byte_ids = [_byte_token(byte_level, b) for b in range(0x80, 0x100)]
    chars = [byte_level.encode(c, add_special_tokens=False) for c in ["日", "🙂", "é", "a", " Привет", "🎉"]]
    for _ in range(30):
        generated: list[int] = []
        while len(generated) < 300:
            roll = rng.random()
            if roll < 0.5:
                generated += [rng.choice(byte_ids) for _ in range(rng.randint(1, 12))]
            elif roll < 0.6:  # a character cut short
                c = rng.choice(chars)
                generated += c[: rng.randint(0, len(c))]
            else:
                generated += rng.choice(chars)
        spy = DecodeSpy(byte_level)
        deltas, tail = _stream(IncrementalDetokenizer(spy, []), generated)
        assert "".join(deltas) + tail == byte_level.decode(generated)
        assert max(spy.sizes) <= WINDOW_BOUND


@pytest.fixture(scope="module")
def straddling() -> PreTrainedTokenizerFast:
    """Byte-level BPE with tokens that straddle characters (the end of one and the start of the
    next: "\xa9\xc3" of "éé", "\x97\xa5\xe6" of "日日"), as large byte-level vocabularies have."""
    b2c = _byte_to_char()
    vocab = {c: i for i, c in enumerate(b2c.values())}
    spell = lambda bs: "".join(b2c[b] for b in bs)  # noqa: E731
    merges = [(spell(b"\xa9"), spell(b"\xc3")), (spell(b"\x97"), spell(b"\xa5")), (spell(b"\x97\xa5"), spell(b"\xe6"))]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize(
    ("text", "head", "straddler", "tail"),
    [("é", b"\xc3", b"\xa9\xc3", b"\xa9"), ("日", b"\xe6", b"\x97\xa5\xe6", b"\x97\xa5")],
)
def test_valid_characters_split_by_straddling_tokens(straddling, text, head, straddler, tail):
    """Valid text whose every window ends inside a character (C3 | A9 C3 | ... | A9): it used to
    be held back to the end of the output, each token re-decoding all of it; it now flows and
    still comes out whole."""
    mid = straddling.get_vocab()["".join(_byte_to_char()[b] for b in straddler)]
    ids = [_byte_token(straddling, b) for b in head] + [mid] * 200 + [_byte_token(straddling, b) for b in tail]
    assert straddling.decode(ids) == text * 201
    spy = DecodeSpy(straddling)
    deltas, end = _stream(IncrementalDetokenizer(spy, []), ids)
    assert "".join(deltas) + end == text * 201
    assert "\ufffd" not in "".join(deltas) + end
    assert len("".join(deltas)) >= 190, "the stream waited for the end"
    assert max(spy.sizes) <= WINDOW_BOUND


# --- StopChecker --------------------------------------------------------------


def reference_stop(text: str, stops: list[str]) -> str:
    """Non-streamed result: cut before the stop string that completes first."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text.endswith(s, 0, end)]
        if hits:
            return text[: end - max(map(len, hits))]
    return text


def run_stop_checker(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    checker = StopChecker(stops)
    max_len = max(map(len, stops), default=1)
    emitted, pushed = "", ""
    for delta in deltas:
        out, stopped = checker.push(delta)
        emitted += out
        pushed += delta
        if stopped:
            assert checker.push("more") == ("", True)
            assert checker.finish() == ""
            return emitted, True
        # Held back is only what could still start a stop string.
        assert pushed.startswith(emitted) and len(pushed) - len(emitted) < max_len
    return emitted + checker.finish(), False


def random_split(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if text else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize(
    ("stops", "deltas", "expected", "stopped"),
    [
        (["STOP"], ["hello S", "T", "OP world"], "hello ", True),  # split over 3 deltas
        (["ab", "bc"], ["x", "a", "b", "c"], "x", True),  # overlapping candidates
        (["ab", "bc"], ["xabc"], "x", True),
        (["bc", "ab"], ["xa", "bc"], "x", True),
        (["hello"], ["hel", "lo world"], "", True),  # stop at the very beginning
        (["world", "o w", "lo"], ["hel", "lo world"], "hel", True),  # earliest wins
        (["world", "o w"], ["hello w", "orld"], "hell", True),
        (["abcd", "c"], ["abcd"], "ab", True),  # "c" completes first
        (["<|end|>"], ["a <|en", "d| b"], "a <|end| b", False),  # false start released
        (["xyz"], ["xy"], "xy", False),  # held back, then released by finish()
        ([], ["any", "thing"], "anything", False),
        (["\n\n"], ["line one\n", "\nline two"], "line one", True),
    ],
)
def test_stop_checker_cases(stops, deltas, expected, stopped):
    assert run_stop_checker(stops, deltas) == (expected, stopped)
    assert reference_stop("".join(deltas), stops) == expected


def test_stop_checker_does_not_hold_text_that_cannot_start_a_stop():
    checker = StopChecker(["STOP"])
    assert checker.push("hello S") == ("hello ", False)
    assert checker.push("x") == ("Sx", False)


def test_stop_checker_rejects_empty_stop():
    with pytest.raises(ValueError):
        StopChecker(["a", ""])


@pytest.mark.parametrize("seed", range(5))
def test_stop_checker_any_split_matches_reference(seed):
    rng = random.Random(seed)
    for _ in range(400):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 30)))
        stops = [
            "".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(0, 3))
        ]
        expected = reference_stop(text, stops)
        if not any(a != b and a in b for a in stops for b in stops) and stops:
            # With no stop inside another, "completes first" is the earliest match.
            starts = [i for s in stops if (i := text.find(s)) != -1]
            assert expected == (text[: min(starts)] if starts else text)
        for _ in range(5):
            assert run_stop_checker(stops, random_split(rng, text))[0] == expected


# --- TextAssembler ------------------------------------------------------------


def test_assembler_stop_inside_a_token(byte_level):
    ids = byte_level.encode("the quick brown fox", add_special_tokens=False)
    asm = TextAssembler(byte_level, [], stop=["ick b"])
    outs = []
    for i in ids:
        out, stopped = asm.add_token(i)
        outs.append(out)
        if stopped:
            break
    assert stopped and asm.stopped
    assert "".join(outs) == asm.text == "the qu"
    assert asm.add_token(ids[-1]) == ("", True)
    assert asm.finish() == ""


@pytest.mark.parametrize("seed", range(3))
def test_assembler_matches_non_streamed(tokenizer, seed):
    rng = random.Random(seed)
    prompt = tokenizer.encode("hello 日本")
    for line in _corpus(seed=10 + seed, n=40):
        generated = tokenizer.encode(" " + line, add_special_tokens=False)
        full = _continuation(tokenizer, prompt, generated)
        # Stops drawn from the text itself (so they hit), plus multi-byte ones.
        stops = [full[a : a + rng.randint(1, 4)] for a in rng.sample(range(len(full)), 2)]
        stops = [s for s in stops if s] + rng.sample(["🙂", "語 ", "zz"], 1)
        asm = TextAssembler(tokenizer, prompt, stop=stops)
        emitted = ""
        for i in generated:
            out, stopped = asm.add_token(i)
            emitted += out
            if stopped:
                break
        else:
            emitted += asm.finish()
        assert emitted == asm.text == reference_stop(full, stops)
        assert asm.stopped == (reference_stop(full, stops) != full)
