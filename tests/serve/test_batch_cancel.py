"""A batch with one bad prompt, through real Ray Serve: the 400, and nothing left generating.

Issue 25: ``prompt: [bad prompt, long prompts...]`` got its 400 at once and the other prompts kept
generating on the replica, outside the tenant's concurrency cap. Here the replica's engine is
watched through the deployment's ``stats``: once the 400 is answered, its generated-token count
must stand still. Two ways to be bad: a token ID outside the vocabulary (refused by the router
before anything is sent) and a prompt too long for max_model_len (refused by the replica, so the
router must cancel the siblings it already sent: ``DeploymentResponse.cancel()`` reaching the
replica's task, whose ``finally`` aborts the engine request).
"""

from __future__ import annotations

import time

import httpx
import pytest
from ray import serve

pytestmark = pytest.mark.serve

CMPL = "/v1/completions"
MAX_MODEL_LEN = 2048  # the TINY demo model's max_position_embeddings
LONG = 1500  # max_tokens of the siblings: seconds of generating if nobody stops them
SIBLINGS = [[1] + [7 + i] * 8 for i in range(3)]


def _stats(serve_env) -> dict:
    return serve.get_deployment_handle("LoRADeployment", app_name=serve_env.app_name).stats.remote().result(timeout_s=60)


def _busy(s: dict) -> int:
    return s["running"] + s["prefilling"] + s["waiting"]


def _idle(serve_env, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = _stats(serve_env)
        if not _busy(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def _error_of(r: httpx.Response) -> str:
    """The error a (possibly streamed) answer carries: a 400 before the stream started, or the
    in-band error event of a stream whose first chunk went out first."""
    if r.status_code == 400:
        return r.json()["error"]["message"]
    assert r.status_code == 200 and '"error"' in r.text, r.text[:500]
    return r.text


@pytest.mark.parametrize("bad, where", [
    ([600], "router"),  # outside the vocabulary [0, 512)
    ([5] * (MAX_MODEL_LEN - LONG + 1), "replica"),  # prompt + max_tokens > max_model_len
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_prompt_leaves_none_of_its_batch_generating(serve_env, bad, where, stream):
    before = _idle(serve_env)
    assert not _busy(before), before
    body = {"model": serve_env.base_name, "prompt": [bad, *SIBLINGS], "max_tokens": LONG, "ignore_eos": True,
            "temperature": 0, "stream": stream}
    r = httpx.post(serve_env.url + CMPL, json=body, timeout=120)
    message = _error_of(r)
    if where == "router":
        assert r.status_code == 400 and "token ID 600" in message and "[0, 512)" in message, message
    else:
        assert "max_model_len" in message, message
    # The siblings were aborted on the replica before the answer: at most the step in flight
    # finishes, then the engine stands still (before the fix: 3 x 1500 tokens kept coming).
    settled = _idle(serve_env, timeout=2.0)
    assert not _busy(settled), settled
    time.sleep(1.0)
    after = _stats(serve_env)
    assert after["generated_tokens"] - settled["generated_tokens"] == 0, (settled, after)
    assert after["generated_tokens"] - before["generated_tokens"] < LONG, (before, after)  # none ran to its end
    if where == "router":  # refused before anything was sent
        assert after["generated_tokens"] == before["generated_tokens"], (before, after)
    # The replica serves the next batch as usual.
    r = httpx.post(serve_env.url + CMPL, json={**body, "prompt": SIBLINGS, "max_tokens": 4, "stream": False},
                   timeout=120)
    assert r.status_code == 200 and len(r.json()["choices"]) == 3, r.text
