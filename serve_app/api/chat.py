"""A conversation -> the engine's prompt token IDs: the one chat path.

``render_chat`` writes the prompt text (the tokenizer's chat template, or a plain
"<role>: <content>" fallback), ``chat_prompt_ids`` tokenizes it as the engine gets it. The
router counts a chat's tokens with it and, when it did (limits on), forwards those IDs; the
replica renders with it only when the router sent the messages (no limit needed the count). One
function on both sides, so a chat is rendered and tokenized the same way wherever it happens.
"""

from __future__ import annotations

from typing import Any

from serve_app.api.protocol import ChatMessage
from serve_app.errors import InvalidRequestError


def render_chat(tokenizer: Any, messages: list[ChatMessage] | list[dict[str, Any]]) -> str:
    """The prompt text for a conversation, ending where the assistant's reply begins.

    Uses the tokenizer's chat template when it has one, else "<role>: <content>\\n"
    per message then "assistant:". A templated prompt usually already holds BOS, so
    tokenize it with ``add_special_tokens=False``.
    """
    msgs = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]
    flat = [{"role": m.role, "content": m.text()} for m in msgs]
    if getattr(tokenizer, "chat_template", None):
        import jinja2  # transformers' template engine; imported late as only this needs it

        try:
            return tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as e:
            # Templates reject conversations they cannot express (raise_exception, e.g.
            # "roles must alternate"): that is the client's request, not a server fault.
            raise InvalidRequestError(f"chat template rejected the messages: {e}") from e
    return "".join(f"{m['role']}: {m['content']}\n" for m in flat) + "assistant:"


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage] | list[dict[str, Any]]) -> list[int]:
    """A conversation's prompt token IDs, as the engine gets them (the one chat -> prompt ids
    path: the replica renders with it and the router counts with it)."""
    text = render_chat(tokenizer, messages)
    # A chat template writes its own BOS; the plain default needs the tokenizer's.
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
