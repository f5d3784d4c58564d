"""Fuzzing the live app with schemathesis against its OpenAPI schema.

The rule for every answer: no 5xx, and every error (status >= 400, or an in-band SSE error
event) in OpenAI's shape ``{"error": {"message": str, "type": str, "code": str}}``.
schemathesis is a test dependency (pyproject's ``test`` extra) and imported plainly: a broken
install fails here instead of skipping. The hand-written malformed-input cases, which do not
need it, are tests/serve/test_malformed.py.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from tests.helpers import check_response

pytestmark = pytest.mark.serve


# ---- schemathesis -----------------------------------------------------------------------------------
# Schemathesis' own pytest fixture loader does not work with this pytest (it sets Node._nodeid,
# gone in pytest 9), so the schema's hypothesis strategy is driven directly.


def _shorten(case, models: list[str]) -> None:
    """Point half of the generated bodies at real models, so they reach the engine, and keep the
    generation short (huge values still reach the validators: only 65..4096 is folded)."""
    body = case.body
    if not isinstance(body, dict):
        return
    m = body.get("model")
    if isinstance(m, str) and len(m) % 2 == 0:
        body["model"] = models[len(m) % len(models)]
    for k in ("max_tokens", "max_completion_tokens"):
        v = body.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and 64 < v <= 4096:
            body[k] = v % 64 + 1
    p = body.get("prompt")
    if isinstance(p, list) and len(p) > 4 and all(isinstance(x, (str, list)) for x in p):
        body["prompt"] = p[:4]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_no_5xx_and_openai_errors(serve_env, mode):
    from collections import Counter

    from hypothesis import given

    schema = schemathesis.openapi.from_url(serve_env.url + "/openapi.json", wait_for_schema=30)
    # Not the adapter lifecycle's writes: on the shared app they could delete other tests' tenants.
    schema = schema.exclude(path_regex="^/admin/", method=["POST", "PUT", "PATCH", "DELETE"])
    strategy = schema.as_strategy(schemathesis.GenerationMode(mode))
    seen: Counter = Counter()
    t_start = time.monotonic()

    @given(case=strategy)
    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        _shorten(case, serve_env.models)
        t0 = time.monotonic()
        r = case.call(base_url=serve_env.url, timeout=60)
        seen[(case.method, case.path, r.status_code)] += 1
        check_response(r.status_code, r.headers.get("content-type", ""), r.text)
        assert time.monotonic() - t0 < 60

    run()
    print(f"schemathesis {mode}: {sum(seen.values())} requests in {time.monotonic() - t_start:.1f}s: "
          f"{dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 20
