"""PathPolicy: promotion, demotion, hysteresis, cooldown, capacity and failures, on a fake clock.

No Ray and no sleeping: traffic is simulated by ``drive``, which records requests every
0.1 s of fake time and calls ``decide`` every 0.5 s, the way routers flush.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from typing import Callable

import pytest
from pydantic import ValidationError

from serve_app.router.path_policy import (
    BUCKETS_PER_RATE_WINDOW,
    Action,
    PathPolicy,
    PolicyConfig,
    PolicyState,
)

# bucket_s = 0.2 s; a steady rate is fully measured 2 s after it starts.
BASE = dict(promote_rps=5.0, demote_rps=1.0, window_s=10.0, rate_window_s=2.0, cooldown_s=30.0, max_merged_tenants=2)

Rate = float | Callable[[float], float]


def make(**overrides) -> PathPolicy:
    return PathPolicy(PolicyConfig(**{**BASE, **overrides}))


def drive(
    policy: PathPolicy,
    rates: dict[str, Rate],
    start: float,
    end: float,
    *,
    step: float = 0.1,
    decide_every: int = 5,
) -> list[tuple[float, Action]]:
    """Simulate ``rates`` (rps, or a function of time) over [start, end); return (time, action)."""
    acc: dict[str, float] = defaultdict(float)
    out: list[tuple[float, Action]] = []
    for i in range(round((end - start) / step)):
        t = start + i * step
        for tenant, rate in rates.items():
            acc[tenant] += (rate(t) if callable(rate) else rate) * step
            n = int(acc[tenant] + 1e-9)
            if n:
                policy.record(tenant, t, n)
                acc[tenant] -= n
        if i % decide_every == 0:
            out += [(t, a) for a in policy.decide(t)]
    return out


def kinds(actions: list[tuple[float, Action]]) -> list[tuple[str, str]]:
    return [(a.kind, a.tenant) for _, a in actions]


def promote_hot(policy: PathPolicy, tenant: str, start: float = 0.0, rps: float = 10.0) -> float:
    """Drive ``tenant`` hot until promoted, mark it ready; returns the promotion time."""
    acts = drive(policy, {tenant: rps}, start, start + 20)
    assert kinds(acts) == [("promote", tenant)]
    policy.mark_ready(tenant)
    assert policy.route(tenant) == "merged"
    return acts[0][0]


# -- static hot tenants ----------------------------------------------------------------------


def test_static_hot_tenant_promoted_at_start_and_lora_until_ready():
    p = make(hot_tenants=["vip", "gold"], dynamic=False, max_merged_tenants=0)
    acts = p.decide(0.0)
    assert [(a.kind, a.tenant) for a in acts] == [("promote", "vip"), ("promote", "gold")]
    assert "static" in acts[0].reason
    assert p.route("vip") == "lora"  # building: traffic stays on LoRA
    assert p.snapshot()["tenants"]["vip"]["state"] == "warming"
    assert p.decide(1.0) == []  # asked once, not on every decide
    assert p.routes() == {}

    assert p.mark_ready("vip", now=5.0)
    assert p.route("vip") == "merged" and p.route("gold") == "lora"
    assert p.routes() == {"vip": "merged"}
    snap = p.snapshot()["tenants"]["vip"]
    assert snap["state"] == "ready" and snap["since"] == 5.0 and snap["static"]

    # Idle for a long time: a static tenant is never demoted.
    assert p.decide(10_000.0) == []
    assert p.route("vip") == "merged"


def test_static_tenants_do_not_use_dynamic_slots():
    p = make(hot_tenants=["vip"], max_merged_tenants=1)
    assert kinds([(0, a) for a in p.decide(0.0)]) == [("promote", "vip")]
    p.mark_ready("vip")
    acts = drive(p, {"t1": 10}, 0.5, 20)
    assert kinds(acts) == [("promote", "t1")]  # the one dynamic slot is still free
    assert p.snapshot()["dynamic_slots"] == {"used": 1, "max": 1, "max_per_owner": 1, "by_owner": {"t1": 1}}


def test_failed_static_tenant_is_retried_after_cooldown():
    p = make(hot_tenants=["vip"], dynamic=False, max_merged_tenants=0)
    p.decide(0.0)
    p.mark_failed("vip", "CUDA out of memory", now=1.0)
    assert p.decide(20.0) == []
    assert [(a.kind, a.tenant) for a in p.decide(31.0)] == [("promote", "vip")]


# -- promotion ---------------------------------------------------------------------------------


def test_sustained_rate_promotes_after_window():
    p = make()
    acts = drive(p, {"t1": 10, "cold": 2}, 0, 30)
    assert kinds(acts) == [("promote", "t1")]
    t, action = acts[0]
    # Rate crosses 5 rps ~1 s in (half the 2 s rate window), then must hold for 10 s.
    assert 10.0 <= t <= 12.5
    assert "above 5.0" in action.reason
    # No downtime: LoRA until the merged replica reports ready.
    assert p.route("t1") == "lora"
    assert p.snapshot()["tenants"]["t1"]["state"] == "warming"
    assert p.mark_ready("t1")
    assert p.route("t1") == "merged" and p.route("cold") == "lora"
    assert p.snapshot()["counters"]["promotions"] == 1


@pytest.mark.parametrize(("rps", "seconds"), [(8.0, 8.5), (50.0, 6.0)])
def test_burst_shorter_than_window_does_not_promote(rps, seconds):
    p = make()
    acts = drive(p, {"t1": lambda t: rps if 1.0 <= t < 1.0 + seconds else 0.0}, 0, 40)
    assert acts == []
    assert p.route("t1") == "lora"


def test_dip_between_decide_calls_breaks_the_run():
    # Samples are taken at bucket edges, not at decide() calls: a gap nobody "saw" still counts.
    p = make()
    gap = lambda t: 0.0 if 6.0 <= t < 9.0 else 10.0  # noqa: E731
    assert drive(p, {"t1": gap}, 0, 16, decide_every=1000) == []
    assert p.decide(16.0) == []
    # The same traffic without the gap promotes, however rarely decide() runs.
    q = make()
    assert drive(q, {"t1": 10}, 0, 16, decide_every=1000) == []  # only one decide, at t=0
    assert [a.kind for a in q.decide(16.0)] == ["promote"]


def test_dynamic_false_never_promotes():
    p = make(dynamic=False, max_merged_tenants=0)
    assert drive(p, {"t1": 100}, 0, 60) == []


# -- hysteresis, demotion, cooldown ---------------------------------------------------------


def test_rate_between_thresholds_changes_nothing():
    p = make()
    promote_hot(p, "t1")
    # 3 rps: below promote_rps, above demote_rps -- stays merged indefinitely.
    assert drive(p, {"t1": 3}, 20, 200) == []
    assert p.route("t1") == "merged"
    # And a tenant at 3 rps that is not merged is never promoted.
    assert drive(p, {"t1": 3, "t2": 3}, 200, 300) == []


def test_below_demote_for_window_demotes():
    p = make(cooldown_s=5)
    promote_hot(p, "t1")
    # A quiet spell shorter than the window does not demote.
    assert drive(p, {"t1": lambda t: 0.5 if t < 28 else 10}, 20, 40) == []
    assert p.route("t1") == "merged"
    acts = drive(p, {"t1": 0.5}, 40, 80)
    assert kinds(acts) == [("demote", "t1")]
    t, action = acts[0]
    assert 50.0 <= t <= 53.0 and "below 1.0" in action.reason
    # LoRA at once: the merged replica is unloaded only after traffic left it.
    assert p.route("t1") == "lora"
    assert p.snapshot()["tenants"]["t1"]["state"] == "demoting"
    assert p.mark_demoted("t1")
    assert "t1" not in p.snapshot()["tenants"]
    assert p.snapshot()["counters"]["demotions"] == 1


def test_idle_merged_tenant_is_demoted():
    p = make(cooldown_s=5)
    promote_hot(p, "t1")
    # No requests at all: the tracker of a merged tenant is kept so it can be demoted.
    assert p.decide(25.0) == []
    assert [(a.kind, a.tenant) for a in p.decide(40.0)] == [("demote", "t1")]


def test_cooldown_blocks_flapping():
    p = make(cooldown_s=60)
    t_promote = promote_hot(p, "t1")
    # Traffic stops right after promotion: below demote_rps for a whole window, but the
    # cooldown holds the demotion until 60 s after the promotion.
    acts = drive(p, {}, 20, 120)
    assert kinds(acts) == [("demote", "t1")]
    t_demote = acts[0][0]
    assert t_demote >= t_promote + 60
    assert t_demote <= t_promote + 61
    p.mark_demoted("t1")
    # Hot again right away: promoted only when the demotion's cooldown ends.
    acts = drive(p, {"t1": 20}, 120, 200)
    assert kinds(acts) == [("promote", "t1")]
    assert t_demote + 60 <= acts[0][0] <= t_demote + 61


# -- capacity ------------------------------------------------------------------------------------


def test_max_merged_tenants_hottest_win():
    p = make(max_merged_tenants=2)
    acts = drive(p, {"warm": 7, "hot": 30, "hotter": 40}, 0, 30)
    assert sorted(kinds(acts)) == [("promote", "hot"), ("promote", "hotter")]
    slots = p.snapshot()["dynamic_slots"]
    assert slots == {"used": 2, "max": 2, "max_per_owner": 1, "by_owner": {"hot": 1, "hotter": 1}}
    # Warming tenants hold their slots too.
    assert drive(p, {"warm": 7, "hot": 30, "hotter": 40}, 30, 60) == []
    p.mark_ready("hot")
    p.mark_ready("hotter")
    # Both incumbents still hot: a waiting candidate does not push them out.
    assert drive(p, {"warm": 7, "hot": 30, "hotter": 40}, 60, 120) == []
    assert p.route("warm") == "lora"


def test_cooled_incumbent_is_preempted_by_hot_candidate():
    p = make(max_merged_tenants=1, cooldown_s=5)
    promote_hot(p, "a")
    # "a" drifts into the hysteresis band (3 rps, not demoted) while "b" is hot.
    acts = drive(p, {"a": 3, "b": 20}, 20, 60)
    assert kinds(acts) == [("demote", "a")]
    assert "preempted by b" in acts[0][1].reason
    assert p.route("a") == "lora"
    # "b" waits until a's replica is really gone (it still holds memory while demoting).
    assert drive(p, {"a": 3, "b": 20}, 60, 70) == []
    p.mark_demoted("a")
    acts = drive(p, {"a": 3, "b": 20}, 70, 80)
    assert kinds(acts) == [("promote", "b")]


# -- slots per owner: one API-key tenant may own many adapters ----------------------------------


def drive_owned(policy: PathPolicy, rates: dict[str, Rate], owners: dict[str, str], start: float, end: float):
    """``drive``, with each adapter's requests reported as sent by ``owners[adapter]``."""
    real = policy.record
    policy.record = lambda tenant, now, n=1, version=None, owner=None: real(  # type: ignore[method-assign]
        tenant, now, n, version=version, owner=owners.get(tenant))
    try:
        return drive(policy, rates, start, end)
    finally:
        policy.record = real  # type: ignore[method-assign]


ACME = {"acme-1": "acme", "acme-2": "acme", "acme-3": "acme", "globex-1": "globex"}


def test_one_owner_cannot_take_every_merged_slot():
    """Counted per adapter, acme's three hot adapters took all three slots and globex's hot
    adapter stayed on LoRA. Per owner (default 1), acme gets one, its hottest, and globex one."""
    p = make(max_merged_tenants=3)
    rates = {"acme-1": 40, "acme-2": 30, "acme-3": 20, "globex-1": 10}
    acts = drive_owned(p, rates, ACME, 0, 30)
    assert sorted(kinds(acts)) == [("promote", "acme-1"), ("promote", "globex-1")]
    slots = p.snapshot()["dynamic_slots"]
    assert slots["by_owner"] == {"acme": 1, "globex": 1} and slots["used"] == 2
    assert p.snapshot()["tenants"]["acme-1"]["owner"] == "acme"
    # The free slot stays free for another owner: acme's other adapters keep waiting.
    p.mark_ready("acme-1")
    p.mark_ready("globex-1")
    assert drive_owned(p, rates, ACME, 30, 60) == []
    acts = drive_owned(p, {**rates, "initech-1": 15}, {**ACME, "initech-1": "initech"}, 60, 90)
    assert kinds(acts) == [("promote", "initech-1")]


def test_merged_slots_per_owner_is_configurable():
    p = make(max_merged_tenants=3, max_merged_per_owner=2)
    acts = drive_owned(p, {"acme-1": 40, "acme-2": 30, "acme-3": 20}, ACME, 0, 30)
    assert sorted(kinds(acts)) == [("promote", "acme-1"), ("promote", "acme-2")]


def test_adapters_without_a_reported_owner_are_their_own_owners():
    # Auth off (or a router that does not report owners): per adapter, as before.
    p = make(max_merged_tenants=3)
    acts = drive(p, {"acme-1": 40, "acme-2": 30, "acme-3": 20}, 0, 30)
    assert len(kinds(acts)) == 3


def test_an_owner_at_its_cap_preempts_only_its_own_adapter():
    p = make(max_merged_tenants=2, cooldown_s=5)
    drive_owned(p, {"acme-1": 20, "globex-1": 20}, ACME, 0, 15)
    p.mark_ready("acme-1")
    p.mark_ready("globex-1")
    # globex-1 cools into the hysteresis band; acme-2 is hot but acme already holds its one
    # slot: demoting globex-1 would not give it a slot, so globex-1 stays.
    assert drive_owned(p, {"acme-1": 20, "globex-1": 3, "acme-2": 30}, ACME, 15, 45) == []
    # Once acme-1 cools too, acme-2 takes acme's own slot from it.
    acts = drive_owned(p, {"acme-1": 2, "globex-1": 3, "acme-2": 30}, ACME, 45, 75)
    assert kinds(acts) == [("demote", "acme-1")] and "preempted by acme-2" in acts[0][1].reason
    p.mark_demoted("acme-1")
    acts = drive_owned(p, {"acme-1": 2, "globex-1": 3, "acme-2": 30}, ACME, 75, 85)
    assert kinds(acts) == [("promote", "acme-2")]


def test_policy_state_takes_owners_with_the_counts():
    s = PolicyState({**BASE, "max_merged_tenants": 2})
    for i in range(40):  # two adapters of one owner at 10 rps each
        s.sync({"acme-1@v1": 5, "acme-2": 5}, now=i * 0.5, owners={"acme-1@v1": "acme", "acme-2": "acme"})
    assert [a.tenant for a in s.decide(now=20.0)] == ["acme-1"]  # same rate: the name breaks the tie
    assert s.snapshot()["dynamic_slots"]["by_owner"] == {"acme": 1}


# -- failures -----------------------------------------------------------------------------------


def test_failed_merge_stays_on_lora_with_reason_and_backoff():
    p = make(cooldown_s=30)
    acts = drive(p, {"t1": 10}, 0, 20)
    assert kinds(acts) == [("promote", "t1")]
    assert p.mark_failed("t1", "NaNs detected in the merged weights", now=20.0)
    assert p.route("t1") == "lora"
    assert not p.mark_ready("t1")  # a late "ready" for a failed build is ignored
    assert p.route("t1") == "lora"
    snap = p.snapshot()
    entry = snap["tenants"]["t1"]
    assert entry["state"] == "failed" and "NaN" in entry["reason"]
    assert entry["since"] == 20.0 and entry["retry_at"] == 50.0 and entry["failures"] == 1
    assert snap["counters"]["failures"] == 1
    assert snap["dynamic_slots"]["used"] == 0  # a failure frees its slot

    # Still hot: retried only once the cooldown has passed.
    acts = drive(p, {"t1": 10}, 20, 60)
    assert kinds(acts) == [("promote", "t1")]
    assert acts[0][0] >= 50.0
    # A second failure in a row doubles the wait.
    p.mark_failed("t1", "NaNs again", now=60.0)
    assert p.snapshot()["tenants"]["t1"]["retry_at"] == 120.0
    acts = drive(p, {"t1": 10}, 60, 130)
    assert kinds(acts) == [("promote", "t1")] and acts[0][0] >= 120.0
    # Success resets the count.
    p.mark_ready("t1")
    assert p.snapshot()["tenants"]["t1"]["failures"] == 0


def test_failure_of_a_ready_replica_moves_back_to_lora():
    p = make()
    promote_hot(p, "t1")
    assert p.mark_failed("t1", "replica died", now=21.0)
    assert p.route("t1") == "lora" and p.routes() == {}


def test_stale_reports_are_ignored():
    p = make()
    assert not p.mark_ready("nobody")
    assert not p.mark_failed("nobody", "x")
    assert not p.mark_demoted("nobody")
    assert p.route("nobody") == "lora"


# -- memory, snapshot, config --------------------------------------------------------------------


def test_idle_tenants_are_forgotten_and_memory_is_bounded():
    p = make()
    for i in range(1000):
        p.record(f"t{i}", i * 0.001)
    for i in range(20_000):  # one busy tenant: its ring never grows past the fixed size
        p.record("busy", i * 0.01)
    assert p.snapshot()["tracked_tenants"] == 1001
    assert len(p._trackers["busy"].ring) == BUCKETS_PER_RATE_WINDOW
    p.decide(500.0)
    assert p.snapshot()["tracked_tenants"] == 0


def test_failed_entry_forgotten_once_quiet_and_retryable():
    p = make()
    drive(p, {"t1": 10}, 0, 20)
    p.mark_failed("t1", "bad", now=20.0)
    p.decide(40.0)
    assert "t1" in p.snapshot()["tenants"]  # still visible within its back-off
    p.decide(51.0)
    assert p.snapshot()["tenants"] == {}


def test_snapshot_shape():
    p = make(hot_tenants=["vip"])
    p.decide(0.0)
    promote_hot(p, "t1", start=0.5)
    snap = p.snapshot()
    assert set(snap) == {"now", "tenants", "dynamic_slots", "tracked_tenants", "counters", "config"}
    t1 = snap["tenants"]["t1"]
    assert set(t1) == {"state", "since", "reason", "rps", "static", "failures", "retry_at", "route", "version",
                       "latest_version", "owner"}
    assert t1["rps"] == pytest.approx(10.0, abs=1.0) and t1["route"] == "merged"
    assert snap["counters"] == {"promotions": 2, "demotions": 0, "failures": 0, "version_updates": 0}
    assert snap["config"]["promote_rps"] == 5.0


def test_policy_state_without_ray():
    s = PolicyState(BASE)
    assert s.record_batch({"t1": 5}, now=0.0) == {}
    for i in range(1, 40):  # 10 rps, flushed every 0.5 s
        s.record_batch({"t1": 5}, now=i * 0.5)
    (action,) = s.decide(now=20.0)
    assert action.kind == "promote"
    assert s.record_batch({"t1": 5}, now=20.1) == {}
    assert s.mark_ready("t1", now=21.0)
    assert s.record_batch({"t1": 5}, now=21.5) == {"t1": "merged"} == s.routes()
    assert s.snapshot()["tenants"]["t1"]["state"] == "ready"


def test_module_imports_without_ray():
    code = "import sys, serve_app.router.path_policy; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (dict(demote_rps=5.0), ["demote_rps (5.0)", "promote_rps (5.0)", "lower demote_rps"]),
        (dict(demote_rps=9.0, promote_rps=3.0), ["demote_rps (9.0)", "promote_rps (3.0)"]),
        (dict(rate_window_s=20.0), ["rate_window_s (20.0)", "window_s (10.0)", "rate_window_s <= window_s"]),
        (dict(max_merged_tenants=0), ["max_merged_tenants", "dynamic: false"]),
        (dict(hot_tenants=["a", "b", "a"]), ["['a']", "more than once"]),
        (dict(hot_tenants=["../etc"]), ["hot_tenants", "'../etc'"]),
        (dict(promote_rps=0), ["promote_rps"]),
        (dict(window_s=-1), ["window_s"]),
        (dict(cooldown_s=-1), ["cooldown_s"]),
        (dict(promot_rps=3), ["promot_rps", "Extra inputs are not permitted"]),
        (dict(max_merged_per_owner=0), ["max_merged_per_owner", "greater than or equal to 1"]),
    ],
)
def test_config_validation(overrides, needles):
    with pytest.raises(ValidationError) as e:
        PolicyConfig(**{**BASE, **overrides})
    for needle in needles:
        assert needle in str(e.value)


def test_config_defaults_and_descriptions():
    cfg = PolicyConfig()
    assert cfg.hot_tenants == [] and cfg.dynamic
    assert cfg.demote_rps < cfg.promote_rps and cfg.rate_window_s <= cfg.window_s
    assert PolicyConfig(dynamic=False, max_merged_tenants=0).max_merged_tenants == 0
    for name, field in PolicyConfig.model_fields.items():
        assert field.description, f"{name} has no description"


# -- versions: a merged copy holds one adapter version ------------------------------------------


def test_merged_copy_is_routed_only_for_the_version_it_holds():
    s = PolicyState({**BASE, "hot_tenants": ["vip"], "dynamic": False, "max_merged_tenants": 0})
    (action,) = s.decide(now=0.0)
    assert (action.kind, action.tenant, action.version, action.mux) == ("promote", "vip", None, None)
    # Not seen yet: the builder resolved v3 from the store and reports it.
    assert s.mark_ready("vip", now=1.0, version=3)
    assert s.sync({"vip@v3": 4}, now=1.5) == {"vip": "vip@v3"} == s.ready_table()
    assert s.routes() == {"vip": "merged"}
    assert s.snapshot()["tenants"]["vip"]["version"] == 3


def test_new_version_goes_to_lora_until_its_copy_is_ready_then_merged_again():
    s = PolicyState({**BASE, "hot_tenants": ["vip"], "dynamic": False, "max_merged_tenants": 0})
    s.decide(now=0.0)
    s.mark_ready("vip", now=1.0, version=1)
    assert s.sync({"vip@v1": 5}, now=1.5) == {"vip": "vip@v1"}
    # A router resolved the update v2 (the table above already keeps it off the v1 copy).
    assert s.sync({"vip@v2": 1, "vip@v1": 2}, now=2.0) == {"vip": "vip@v1"}
    (action,) = s.decide(now=2.1)
    assert (action.kind, action.version, action.previous, action.mux) == ("promote", 2, 1, "vip@v2")
    assert "v2" in action.reason
    # The old copy is no longer routed, to anyone: the tenant is on LoRA (v2) meanwhile.
    assert s.ready_table() == {} and s.routes() == {}
    assert s.snapshot()["tenants"]["vip"]["state"] == "warming"
    assert s.decide(now=2.6) == []  # one re-warm per version, not one per decide
    # A late report from the old build, or an old router's stale count, changes nothing.
    assert not s.mark_ready("vip", now=3.0, version=1)
    assert not s.mark_failed("vip", "old build broke", now=3.0, version=1)
    s.sync({"vip@v1": 3}, now=3.1)
    assert s.decide(now=3.2) == [] and s.ready_table() == {}
    assert s.mark_ready("vip", now=4.0, version=2)
    assert s.ready_table() == {"vip": "vip@v2"}
    assert s.snapshot()["counters"]["version_updates"] == 1


def test_version_update_while_warming_supersedes_the_build():
    p = make(hot_tenants=["vip"], dynamic=False, max_merged_tenants=0)
    p.record("vip", 0.0, version=1)
    (a1,) = p.decide(0.1)
    assert (a1.version, a1.previous) == (1, None)
    p.record("vip", 0.5, version=2)
    (a2,) = p.decide(0.6)
    assert (a2.kind, a2.version, a2.previous) == ("promote", 2, 1)
    assert not p.mark_ready("vip", version=1)  # the v1 build finished too late: its copy is freed
    assert p.route("vip") == "lora"
    assert p.mark_ready("vip", version=2) and p.ready_table() == {"vip": "vip@v2"}


def test_dynamic_tenant_update_and_demotion_carry_versions():
    p = make()
    acts = []
    for i in range(200):  # 10 rps on v1 for 20 s
        p.record("t1", i * 0.1, version=1)
        if i % 5 == 0:
            acts += p.decide(i * 0.1)
    (promote,) = acts
    assert (promote.kind, promote.version) == ("promote", 1)
    assert p.mark_ready("t1", version=1)
    for i in range(200, 210):
        p.record("t1", i * 0.1, version=2)
    (update,) = p.decide(21.0)
    assert (update.kind, update.version, update.previous) == ("promote", 2, 1)  # no cooldown for an update
    assert p.mark_ready("t1", version=2)
    acts = drive(p, {}, 21.0, 200.0)
    (demote,) = [a for _, a in acts]
    assert (demote.kind, demote.version) == ("demote", 2)
    assert p.mark_demoted("t1")


def test_failed_version_is_retried_with_the_newest_version():
    p = make(hot_tenants=["vip"], dynamic=False, max_merged_tenants=0, cooldown_s=10.0)
    p.record("vip", 0.0, version=4)
    (a,) = p.decide(0.0)
    assert p.mark_failed("vip", "non-finite", now=1.0, version=4)
    p.record("vip", 2.0, version=5)
    assert p.decide(5.0) == []  # still backing off
    (retry,) = p.decide(11.5)
    assert (retry.kind, retry.version, retry.previous) == ("promote", 5, None)


def test_the_router_counts_each_request_toward_its_api_key_tenant(monkeypatch):
    """The merged-slot cap is per owner (the API key's tenant): the router must tell the promoter
    who sent each request, or every adapter counts as its own owner and the cap does nothing."""
    import types

    from serve_app import metrics
    from serve_app.router import ingress

    seen = []

    class Promoter:
        def path_for(self, adapter_id, mux=None, owner=None):
            seen.append((adapter_id, mux, owner))
            return "lora"

    class Metric:
        def inc(self, *a, **k):
            pass

    monkeypatch.setattr(metrics, "ROUTER_PATH", Metric())
    monkeypatch.setattr(metrics, "REQUESTS", Metric())
    router = types.SimpleNamespace(base_model_name="base", promoter=Promoter(),
                                   admin=types.SimpleNamespace(resolve=lambda name: f"{name}@v3"))
    resolve = ingress.Router._resolve.__get__(router)
    assert resolve("acme-support", None, "acme") == ("acme-support@v3", "lora")
    assert resolve("acme-support", None, None) == ("acme-support@v3", "lora")  # auth off: the adapter owns itself
    assert resolve("base", None, "acme") == (None, "lora")
    assert seen == [("acme-support", "acme-support@v3", "acme"), ("acme-support", "acme-support@v3", "acme-support")]
