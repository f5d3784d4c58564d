"""HTTP admission: may this caller send this request now? Decided before anything is forwarded.

In order, for ``/v1/completions`` and ``/v1/chat/completions`` (Python handle callers are
trusted and skip all of it):

1. the caller (``principal_of``: 401 if the middleware left none) may use the model it names
   (403, asked before the adapter is looked up, so the answer does not say whether it exists);
2. its text is valid Unicode (``check_unicode``: a lone surrogate would fail in the tokenizer, or
   in an echo, as a 500);
3. its sequences (prompts x n, or best_of's candidates: each one an engine request) are within
   the prompts-per-request cap: checked here, once, before any prompt is tokenized;
4. its token IDs (prompts, ``logit_bias`` keys) are in the model's vocabulary, so no prompt of
   a batch fails on a replica while its siblings already generate;
5. its prompts' tokens are counted, when a limit needs the counts, with the model's own
   tokenizer (a chat rendered with its template first, api/chat.py): those token IDs are what
   the replica gets, so a prompt is tokenized once;
6. its response cannot exceed the logprob-entry cap, and the tenant is within its buckets and
   concurrency (router/limits.py): 400, or 429 with Retry-After, or a ``Lease`` held until the
   response ends.

The result is the lease and the request's ``ResolvedRequest`` (router/serving.py): the model
name, the tenant (the API key's, so its adapters and its base-model requests share one limit and
one fair share; with auth off, the model), the sampling parameters per sequence, the counted
token IDs and the key's prefix-cache salt (whose cached prompt prefixes its requests may reuse).

A mixin of the Router (router/ingress.py): it reads the router's ``auth``, ``limiter``,
``base_model_name`` and ``default_max_tokens``.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from serve_app.api.protocol import ChatCompletionRequest, CompletionRequest
from serve_app.errors import InvalidRequestError
from serve_app.router.auth import principal_of
from serve_app.router.limits import Lease
from serve_app.router.serving import ResolvedRequest


class Admission:
    """The Router's ``_admit`` (see the module docstring)."""

    async def _admit(
        self, raw: Request, body: CompletionRequest | ChatCompletionRequest, header: str | None
    ) -> tuple[Lease, ResolvedRequest]:
        model = header or body.model
        principal = principal_of(raw, self.auth)  # 401 if the middleware left no caller: never admin
        check_unicode(body, model)
        self.auth.authorize(principal, None if model == self.base_model_name else model)
        limiter = self.limiter
        prompts = 1 if isinstance(body, ChatCompletionRequest) else len(body.prompts())
        limiter.check_prompt_count(prompts * body.sequences)
        limiter.check_token_ids(body)
        tokens = await limiter.tokenize(body)
        rr = ResolvedRequest.of(body, self.default_max_tokens, model=model, tenant=principal.tenant,
                                prompt_ids=tokens.ids, cache_salt=principal.cache_salt)
        counts = [c for c in tokens.counts for _ in range(body.sequences)]  # every sequence counts
        limiter.check_response_size(counts, rr.params.max_tokens, rr.params.logprobs, rr.params.echo)
        return limiter.admit(rr.tenant, counts, rr.params.max_tokens), rr


def check_unicode(request: Any, *extra: str | None) -> None:
    """400 for text that is not valid Unicode: a JSON ``\\udc80`` escape decodes to a lone
    surrogate, which no tokenizer can encode (it would fail in the replica as a 500), and no
    response that echoes it (``model``, ``extra``: e.g. the model header) can be encoded."""
    texts: list[str] = [t for t in (getattr(request, "model", None), *extra) if isinstance(t, str)]
    if hasattr(request, "messages"):
        for m in request.messages:
            c = m.content
            texts += [c] if isinstance(c, str) else [getattr(part, "text", "") for part in c]
    else:
        p = request.prompt
        texts += [p] if isinstance(p, str) else [x for x in p if isinstance(x, str)]
    stop = getattr(request, "stop", None)
    texts += [stop] if isinstance(stop, str) else list(stop or [])
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(
                f"text contains an unpaired surrogate ({t[e.start]!r} at character {e.start}); "
                "send valid Unicode (UTF-8)",
                code="invalid_unicode",
            ) from None
