"""Streaming text for one request: incremental detokenization plus stop strings.

Two problems make "decode the new token and append it" wrong:

* A token is not a unit of text. Byte-level BPE tokens (and sentencepiece byte
  fallback tokens) can hold part of a multi-byte UTF-8 character, and
  sentencepiece-style decoders change a token's text depending on whether it is
  the first one decoded (the leading "▁" is stripped). So text is decoded over a
  small window of tokens and only the part that grew is emitted
  (``IncrementalDetokenizer``, the prefix_offset / read_offset technique of
  TGI and vLLM).
* Stop strings may be split over deltas, and the client must never see text that
  later turns out to belong to a stop string. So the trailing text that could
  still be the start of a stop string is held back (``StopChecker``).

``TextAssembler`` chains both; the engine keeps one per request and feeds it one
token per step. Per-token cost depends on a few tokens and on the longest stop
string, never on the length of the text generated so far -- also on output that
is not valid UTF-8: a window still ending in U+FFFD after ``MAX_PENDING_TOKENS``
tokens is emitted up to that last character and moves on. Holding text back
until it stops ending in U+FFFD (what TGI and vLLM do) let a caller who forces a
lone continuation byte with ``logit_bias`` make every token re-decode the whole
output: 4,096 such tokens took 1.7 s of the engine thread instead of 23 ms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# How many prompt tokens to decode in front of the first generated token, so
# that its text is the in-context one (e.g. sentencepiece keeps its leading space).
PROMPT_CONTEXT_TOKENS = 5

_INCOMPLETE = "\ufffd"  # what a decoder yields for a truncated UTF-8 sequence
# Tokens a window may hold unemitted while its text ends in U+FFFD. A truncated UTF-8
# character is at most 3 bytes and every token in the window carries at least one byte,
# so 4 pending tokens hold more than any character can still need: all but the trailing
# U+FFFD (at most _MAX_OWED of them) is final, is emitted, and the window moves on.
MAX_PENDING_TOKENS = 4
# Characters a truncated UTF-8 tail can decode to: one U+FFFD (from_utf8_lossy, the
# byte-level decoder) or one per byte (ByteFallback), and it is at most 3 bytes.
_MAX_OWED = 3


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    ``add_token`` returns the text that became stable with this token: "" while
    the window's text ends in U+FFFD (an incomplete UTF-8 sequence that later
    tokens may complete). ``flush`` returns whatever is still held back.

    Invariant: the deltas plus ``flush()`` concatenate to
    ``decode(ctx + generated)[len(decode(ctx)):]`` where ``ctx`` is the last
    ``PROMPT_CONTEXT_TOKENS`` (non-skipped) prompt tokens. That is
    ``decode(generated)`` for byte-level tokenizers and for an empty prompt; for
    sentencepiece-style tokenizers it differs only in keeping the first
    generated token's leading space, which belongs in the continuation.
    (Decoders that are not prefix-stable on invalid UTF-8, e.g. ByteFallback on
    a byte sequence that never becomes valid, can break it; vLLM shares that.)

    Invalid UTF-8 stays linear: once ``MAX_PENDING_TOKENS`` tokens are pending
    and the text still ends in U+FFFD, everything but its trailing U+FFFD (at
    most ``_MAX_OWED``, the most a truncated character decodes to) is emitted,
    U+FFFD where the decoder puts it, and the pending tokens become the next
    window's prefix, its trailing characters still owed (``_emitted`` counts the
    prefix's characters already sent). With a decoder that replaces each maximal
    invalid byte run by one U+FFFD and a truncated tail by one U+FFFD (the
    byte-level decoder, ``String::from_utf8_lossy``), no character before the
    last one changes when bytes are appended, so the invariant holds exactly,
    U+FFFD placement included, and a character split over tokens that straddle
    character boundaries still comes out whole.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Skipped ids never enter the window: decode would drop them anyway, and a
        # run of them (e.g. EOS with ignore_eos) would otherwise grow the window.
        self._skipped: frozenset[int] = (
            frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        )
        self.token_ids: list[int] = []  # every generated id, skipped ones included

        context: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(context) == PROMPT_CONTEXT_TOKENS:
                break
            if token_id not in self._skipped:
                context.append(token_id)
        context.reverse()
        # _window is tokens[prefix_offset:]; _read_offset is relative to it.
        # decode(_window[:_read_offset]) is text already emitted (or prompt).
        self._window: list[int] = context
        self._read_offset = len(context)
        # Characters of decode(_window[:_read_offset]) already emitted (or prompt): all
        # but the last _owed, which a forced advance left for later tokens to settle.
        self._emitted = len(self._decode(context))
        self._owed = 0

    def _decode(self, ids: list[int]) -> str:
        # Cleanup (" ." -> ".") depends on neighbouring text, so it is not
        # stable under windowing; it is off for the non-streamed decode too.
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def add_token(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        if token_id in self._skipped:
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        complete = not text.endswith(_INCOMPLETE)
        if complete and len(text) > self._emitted:
            return self._advance(text, owe=0)
        if len(self._window) - self._read_offset < MAX_PENDING_TOKENS:
            return ""  # a character may still be completed by the next token
        # More pending tokens than any UTF-8 character needs: what they hold is invalid (or
        # characters split by tokens that straddle them). Emit all but the trailing U+FFFD.
        return self._advance(text, owe=0 if complete else _MAX_OWED)

    def flush(self) -> str:
        """Emit what is still held back (e.g. a truncated character at the end)."""
        if self._read_offset == len(self._window) and not self._owed:
            return ""
        return self._advance(self._decode(self._window), owe=0)

    def _advance(self, text: str, *, owe: int) -> str:
        """Emit ``text`` past what was emitted, but for up to ``owe`` trailing U+FFFD, and make
        the tokens just read the next window's prefix."""
        # The tokens just read become the next window's prefix: enough context
        # for the decoder, and it keeps the window a few tokens long. Tokens whose characters
        # were owed stay too: a window must not start inside a character that later bytes
        # complete (ByteFallback turns a whole byte run with a stray byte into U+FFFD).
        del self._window[: max(0, self._read_offset - self._owed)]
        self._read_offset = len(self._window)
        prefix = self._decode(self._window)
        # Owe only U+FFFD that both texts end in: the owed characters must come from the new
        # prefix's own bytes, or they could not be told apart from it later. (With tokens that
        # decode to nothing, none may be left: they are then emitted as they stand. Linear,
        # if not exact.)
        owe = min(owe, _trailing_incomplete(text), _trailing_incomplete(prefix))
        delta = text[self._emitted : len(text) - owe]
        self._owed = owe
        self._emitted = len(prefix) - owe
        return delta


def _trailing_incomplete(text: str) -> int:
    """How many U+FFFD ``text`` ends in, counting at most ``_MAX_OWED``."""
    n = 0
    while n < _MAX_OWED and n < len(text) and text[-1 - n] == _INCOMPLETE:
        n += 1
    return n


class StopChecker:
    """Cuts streamed text before the first stop string (OpenAI semantics).

    ``push(delta)`` returns ``(text safe to emit now, stopped)``. Text is held
    back while it could still be the beginning of a stop string, so what has
    been emitted is always final. Once stopped, the emitted text ends right
    before the stop string, and later pushes return ``("", True)``.
    ``finish()`` returns the held-back text when generation ends otherwise.

    "First" means the stop string that is complete first as text arrives (the
    engine stops generating there); among those ending at the same character
    the one starting earliest (longest) wins. This equals the earliest match in
    the final text unless one stop string contains another, e.g. stops
    ["abcd", "c"] on "abcd" stop at "c". The result never depends on how the
    text was split into deltas.
    """

    def __init__(self, stop: Iterable[str]) -> None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if "" in stops:
            raise ValueError("stop strings must be non-empty")  # "" would match at 0
        self._stops = list(dict.fromkeys(stops))
        self._max_len = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return delta, False
        # _held holds every suffix of the text so far that could begin a stop
        # string, so a match ending in `delta` starts inside `text`.
        text = self._held + delta
        end = min(
            (i + len(s) for s in self._stops if (i := text.find(s)) != -1),
            default=-1,
        )
        if end != -1:
            start = min(end - len(s) for s in self._stops if text.endswith(s, 0, end))
            self._held = ""
            self.stopped = True
            return text[:start], True
        keep = self._held_back_start(text)
        self._held = text[keep:]
        return text[:keep], False

    def finish(self) -> str:
        held, self._held = self._held, ""
        return held

    def _held_back_start(self, text: str) -> int:
        # Earliest position whose suffix is a proper prefix of some stop string;
        # only the last max_len - 1 characters can qualify.
        for i in range(max(0, len(text) - self._max_len + 1), len(text)):
            tail = text[i:]
            if any(s.startswith(tail) for s in self._stops):
                return i
        return len(text)


class TextAssembler:
    """One request's output text: token ids in, stop-checked text deltas out.

    ``add_token(id)`` returns ``(delta, hit_stop)``; after a stop, the engine
    should finish the request with finish_reason "stop". ``finish()`` returns
    the remaining text when generation ends for another reason (length, EOS,
    stop token id). ``text`` is everything emitted so far.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        stop: Iterable[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
        self.stop_checker = StopChecker(stop)
        self._pieces: list[str] = []

    @property
    def stopped(self) -> bool:
        return self.stop_checker.stopped

    @property
    def token_ids(self) -> list[int]:
        return self.detokenizer.token_ids

    @property
    def text(self) -> str:
        if len(self._pieces) > 1:  # join lazily; the engine reads text rarely
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add_token(self, token_id: int) -> tuple[str, bool]:
        if self.stop_checker.stopped:
            return "", True
        delta = self.detokenizer.add_token(token_id)
        if not delta:
            return "", False
        out, stopped = self.stop_checker.push(delta)
        self._pieces.append(out)
        return out, stopped

    def finish(self) -> str:
        if self.stop_checker.stopped:
            return ""
        # The flushed tail can still complete a stop string.
        out, stopped = self.stop_checker.push(self.detokenizer.flush())
        if not stopped:
            out += self.stop_checker.finish()
        self._pieces.append(out)
        return out
