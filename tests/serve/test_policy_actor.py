"""The named PolicyState actor: every handle, from any process, sees the same routing table.

Reuses the session's Ray (the ``serve_env`` fixture in conftest.py) rather than starting a
second one; the app it deploys is not used here.
"""

from __future__ import annotations

import uuid

import pytest

from serve_app.router.path_policy import POLICY_NAMESPACE, PolicyConfig, get_or_create_policy_actor

pytestmark = pytest.mark.serve


def test_two_handles_share_one_policy(serve_env):
    import ray

    name = f"policy-test-{uuid.uuid4().hex[:8]}"
    cfg = PolicyConfig(hot_tenants=["vip"], dynamic=False, max_merged_tenants=0)
    first = get_or_create_policy_actor(cfg, name)
    try:
        # A second "router replica": same name, so the same actor; the first config wins.
        second = get_or_create_policy_actor(PolicyConfig(), name)
        assert ray.get(second.config.remote())["hot_tenants"] == ["vip"]

        (action,) = ray.get(first.decide.remote(0.0))
        assert (action.kind, action.tenant) == ("promote", "vip")
        assert ray.get(second.routes.remote()) == {}  # warming: still LoRA everywhere
        assert ray.get(first.mark_ready.remote("vip", 1.0))
        assert ray.get(second.record_batch.remote({"other": 3}, 1.5)) == {"vip": "merged"}
        assert ray.get(first.snapshot.remote())["tenants"]["vip"]["state"] == "ready"

        # From another worker process, as a replica in another namespace would look it up.
        @ray.remote(num_cpus=0)
        def routes_elsewhere(actor_name: str) -> dict:
            from serve_app.router.path_policy import PolicyConfig, get_or_create_policy_actor

            handle = get_or_create_policy_actor(PolicyConfig(), actor_name)
            return ray.get(handle.routes.remote())

        assert ray.get(routes_elsewhere.remote(name), timeout=30) == {"vip": "merged"}
        assert ray.get(ray.get_actor(name, namespace=POLICY_NAMESPACE).routes.remote()) == {"vip": "merged"}
    finally:
        ray.kill(first)
