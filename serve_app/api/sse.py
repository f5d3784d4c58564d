"""Server-sent events in the framing OpenAI (and its official client) use.

Each event is one ``data: <compact JSON>`` line and a blank line; the stream ends with
``data: [DONE]``. JSON escapes newlines inside strings, so a payload can never break
the one-line framing. What a chunk contains (``finish_reason: null`` kept, empty
``delta`` keys and null ``usage`` left out) is decided by the models' serializers in
``protocol.py``, not here, so every producer of a chunk gets the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from serve_app.api.errors import error_body

MEDIA_TYPE = "text/event-stream"

# Proxies (nginx) buffer responses by default, which turns a token stream into one
# late burst; these ask them not to.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

DONE = "data: [DONE]\n\n"


def encode_event(obj: BaseModel | dict[str, Any]) -> str:
    """``data: {json}\\n\\n`` for one chunk."""
    if isinstance(obj, BaseModel):
        payload = obj.model_dump_json()
    else:
        # Same bytes as pydantic's dump: compact separators, UTF-8 rather than \\u escapes.
        payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n"


def encode_error(exc: BaseException, *, redact: bool = True) -> str:
    """An error that happens after the 200 and the first chunk have been sent.

    The status line is gone by then, so, like vLLM, send ``data: {"error": {...}}``;
    the official client raises ``openai.APIError`` with that body. Follow it with
    ``DONE`` so clients that wait for the terminator stop too. Streams go to tenants, so
    store URIs and local paths are taken out of the message (``redact_locations``).
    """
    return encode_event(error_body(exc, redact=redact))
