"""API keys opt into sharing cached prompt prefixes (issue 25 item 8).

The engine salts every prefix-cache entry: requests reuse each other's cached prompt prefixes
only under one salt (engine: ``submit(..., tenant=, cache_salt=)``, tests/unit/test_kv_isolation.py).
A key's ``prefix_cache_group`` sets its requests' salt: keys naming one group share, a key
without one shares only with its own tenant. Here the real router (auth, admission, serving)
and the real LoRA replica code pass the salt to the engine, a fake that records it.
"""

from __future__ import annotations

import types

import pytest
from fastapi.testclient import TestClient
from ray import serve

from serve_app import metrics
from serve_app.router import ingress
from serve_app.router.api_keys import KeyEntry
from serve_app.router.auth import Authenticator
from serve_app.router.limits import LimitsConfig, TenantLimiter
from serve_app.router.streams import ChannelHub
from tests.unit.test_batch_cancel import FakeEngine, FakeHandle, _Metric, _replica

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
KEYS = {  # key -> (tenant, prefix_cache_group)
    "sk-acme-" + "a" * 24: ("acme", "partners"),
    "sk-globex-" + "b" * 24: ("globex", "partners"),
    "sk-initech-" + "c" * 24: ("initech", None),
    "sk-initech-2-" + "d" * 24: ("initech", None),  # a second key of one tenant
    "sk-umbrella-" + "e" * 24: ("umbrella", None),
    "sk-named-" + "f" * 24: ("partners", None),  # a tenant named like the group
}


@pytest.fixture
def keyed(monkeypatch):
    for name in ("REQUESTS", "ROUTER_PATH", "LATENCY", "TTFT", "GENERATED_TOKENS"):
        monkeypatch.setattr(metrics, name, _Metric())
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "")
    engine = FakeEngine()
    router = object.__new__(ingress.Router.__mro__[1])
    router.auth = Authenticator([KeyEntry(tenant=t, key=k, prefix_cache_group=g) for k, (t, g) in KEYS.items()])
    router.limiter = TenantLimiter.from_config(LimitsConfig(), max_num_seqs=8)
    router.lora = FakeHandle(_replica(engine))
    router.merged = None
    router.admin = types.SimpleNamespace(resolve=lambda n: f"{n}@v1", model_ids=lambda: [])
    router.base_model_name = "base"
    router.default_max_tokens = 2
    router.promoter = None
    router.streams = ChannelHub(key="router-1")
    router._handles = {}
    monkeypatch.setitem(ingress._EDGE, "auth", router.auth)
    monkeypatch.setitem(ingress._EDGE, "max_body_bytes", LimitsConfig().max_body_bytes)
    monkeypatch.setattr(serve, "get_replica_context",
                        lambda: types.SimpleNamespace(servable_object=router, replica_id="replica-1"))
    with TestClient(ingress.app, raise_server_exceptions=False) as client:
        yield client, engine


@pytest.mark.parametrize("path, body", [
    (CMPL, {"prompt": [1, 2, 3], "max_tokens": 2}),
    (CMPL, {"prompt": [1, 2, 3], "max_tokens": 2, "stream": True}),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2}),
])
def test_keys_in_one_prefix_cache_group_share_and_other_keys_do_not(keyed, path, body):
    client, engine = keyed
    salts = {}
    for key in KEYS:
        before = len(engine.requests)
        r = client.post(path, json={"model": "base", **body}, headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        got = {req.cache_salt for req in engine.requests[before:]}
        assert len(got) == 1 and None not in got, got  # every request of a key carries its salt
        salts[key] = got.pop()
    acme, globex, initech, initech_2, umbrella, named = salts.values()
    assert acme == globex  # one group: the engine sees one salt, so they share cached prefixes
    assert initech == initech_2  # no group: a tenant's keys share with each other, as before
    # ...and with nobody else: not another tenant, not the group, not a tenant named like the group.
    assert len({acme, initech, umbrella, named}) == 4


def test_the_group_is_described_and_optional():
    field = KeyEntry.model_fields["prefix_cache_group"]
    assert field.default is None and "share prefix-cache entries" in field.description
    assert KeyEntry(tenant="t", key="k" * 20).prefix_cache_group is None
