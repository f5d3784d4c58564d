"""Which path serves a tenant: the multiplexed LoRA deployment (default) or a merged copy.

(The router's one policy. Which replica of a path serves a request is deployments/routing.py's
choice, and which request an engine runs next is its scheduler's.)

Why two paths (dLoRA-style, simplified): the multiplexed LoRA path serves any tenant with
no warm-up but pays the extra ``x @ A @ B`` per LoRA layer and batches tenants together; a
merged replica (adapter folded into the base weights) runs at base-model speed but costs a
whole model copy per tenant. So a few *hot* tenants are worth a merged copy; everyone else
shares the LoRA path. dLoRA switches per batch with a cost model; we only switch per tenant
on sustained request rate, which is cheap to measure and hard to fool.

Rate measurement (``_RateTracker``): per tenant, a ring of ``BUCKETS_PER_RATE_WINDOW``
count buckets covering the last ``rate_window_s`` seconds. At every bucket edge the rate is
sampled as ``requests in the ring / rate_window_s``. Memory is constant per tenant whatever
the traffic, and a tenant whose ring is empty and that holds no merged copy is forgotten.

Decisions (``PathPolicy.decide``):

* Promote a tenant when every rate sample of the last ``window_s`` seconds is above
  ``promote_rps``. Requiring a *run* of samples instead of a window average means a short
  burst does not buy a model copy, however intense it is; the rate's own smoothing lets a
  burst look at most ``rate_window_s`` longer than it was.
* Demote a dynamically merged tenant when every sample of the last ``window_s`` seconds is
  below ``demote_rps``. The gap between ``demote_rps`` and ``promote_rps`` is hysteresis: a
  tenant hovering around one threshold does not flap. ``demote_rps = 0`` never demotes on
  rate; such tenants leave only when preempted.
* Per tenant, no new action within ``cooldown_s`` of the last one (promotion started,
  demotion started, failure): building a merged copy takes minutes of GPU time, so a
  decision must stick for a while.
* At most ``max_merged_tenants`` *dynamic* tenants hold a merged copy (warming, ready or
  still demoting, since all of those hold memory). When more qualify, the hottest win. A
  qualifying tenant may also preempt the coldest ready dynamic tenant, but only one whose
  rate is no longer above ``promote_rps`` and is lower than the candidate's: two tenants
  that are both hot keep what they have, so the slot does not thrash between them.
* At most ``max_merged_per_owner`` of those slots per *owner*: the API-key tenant whose
  requests drive an adapter's rate (routers report it with the counts). A "tenant" here is an
  adapter ID, and one customer may own many: counted per adapter, one customer with a few hot
  adapters took every slot. A candidate whose owner is at its cap waits (its free slot goes to
  the next candidate) and may preempt only its own owner's coldest adapter. An adapter with no
  reported owner (auth off) is its own owner.
* ``hot_tenants`` are always merged. They do not use dynamic slots (``max_merged_tenants``
  counts dynamic tenants only), are never demoted, and ``decide`` asks for them at start.

No downtime: ``decide`` only *starts* a change. A promoted tenant is ``warming`` and keeps
being routed to LoRA until whoever builds the merged replica calls ``mark_ready``; a demoted
tenant is routed to LoRA at once (``demoting``) and the merged replica is unloaded after,
reported with ``mark_demoted``. Losing the whole policy state routes everyone to LoRA, which
is always correct, only slower.

Failures: ``mark_failed`` (e.g. the merge found NaN weights) keeps the tenant on LoRA in
state ``failed`` with the reason, logged and shown by ``snapshot``. It is retried only once
the tenant qualifies again after a back-off of ``cooldown_s`` doubled per consecutive
failure (capped at 64x): a broken adapter must not burn a model build every cooldown, yet a
transient failure (out of memory during a deploy) heals without an operator.

Versions: a merged copy holds one adapter *version*, ``<id>@v<n>`` (adapters/registry.py).
Routers report their counts keyed by the multiplexed ID they resolved, so the policy learns
each tenant's newest version from the traffic itself (versions only grow). A tenant is routed
to its merged copy only by a router that resolved the same version the copy holds
(``ready_table``), so a copy never answers for a version other than the one the LoRA path
would serve on that router. When a newer version of a warming or ready tenant shows up, the
entry goes back to ``warming`` for the new version at once (no cooldown: an update is an
operator's act, not a rate measurement): the tenant is served from the LoRA path (new
version) until the copy of the new version reports ready; the promote action names the
``previous`` version, whose copy the caller unloads first. ``mark_ready`` / ``mark_failed``
for a version the entry no longer holds are ignored. A static hot tenant is promoted at start
with ``version=None`` (not seen yet): the caller resolves the current version from the store.

``PathPolicy`` is pure and clock-injected (every method takes ``now``), so tests drive time
by hand. ``PolicyState`` wraps one in a named Ray actor so every router replica sees the
same decisions: routers count requests locally, flush the counts every ~0.5 s with
``record_batch``, and route from the table that call returns.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from serve_app.adapters.registry import mux_id, parse_mux_id
from serve_app.router.config import BUCKETS_PER_RATE_WINDOW, PolicyConfig

logger = logging.getLogger(__name__)

Path = Literal["merged", "lora"]
ActionKind = Literal["promote", "demote"]
TenantState = Literal["warming", "ready", "failed", "demoting"]

# Back-off for failed merges: cooldown_s * 2**(failures - 1), at most this multiple.
MAX_FAILURE_BACKOFF = 64
POLICY_NAMESPACE = "serve_app"
POLICY_ACTOR_NAME = "serve_app_path_policy"


@dataclass(frozen=True)
class Action:
    """A change for the caller to start: build (promote) or unload (demote) a merged replica.

    ``version``: the adapter version to build (promote) or unload (demote); None when the policy
    has not seen one yet (the caller resolves the current one). ``previous``: on a promote for a
    new version, the version whose merged copy is no longer routed and should be unloaded first.
    """

    kind: ActionKind
    tenant: str
    reason: str
    version: int | None = None
    previous: int | None = None

    @property
    def mux(self) -> str | None:
        """The multiplexed model ID of ``version`` (None if unknown)."""
        return None if self.version is None else mux_id(self.tenant, self.version)


@dataclass
class _Entry:
    """A tenant that has, or is getting, or failed to get, a merged replica."""

    state: TenantState
    since: float
    reason: str
    static: bool
    failures: int = 0  # consecutive; reset by mark_ready
    retry_at: float | None = None  # failed only: earliest promotion retry
    version: int | None = None  # the adapter version the merged copy holds (None: not resolved yet)


class _RateTracker:
    """Request counts in fixed buckets, and runs of rate samples above / below thresholds.

    Bucket ``i`` covers ``[i * bucket_s, (i + 1) * bucket_s)``. A sample is taken at each
    bucket edge, so the runs depend only on request times, not on how often ``decide``
    runs. Run starts are bucket indices: integer arithmetic, no float drift.
    """

    __slots__ = ("idx", "cur", "ring", "total", "rate", "above_from", "below_from")

    def __init__(self, idx: int):
        self.idx = idx  # bucket being filled
        self.cur = 0  # its count
        self.ring: deque[int] = deque(maxlen=BUCKETS_PER_RATE_WINDOW)  # completed buckets
        self.total = 0  # sum(ring), kept to avoid summing on every sample
        self.rate = 0.0  # requests/s at the last edge
        self.above_from: int | None = None  # edge index where the current above-run began
        self.below_from: int | None = None

    def add(self, n: int) -> None:
        self.cur += n

    def advance(self, idx: int, cfg: PolicyConfig) -> None:
        steps = idx - self.idx
        if steps <= 0:  # same bucket, or a clock that stepped back: count it in the current one
            return
        # After ring-length + 1 edges the ring holds only zeros and every later sample is 0,
        # so a long-idle tenant costs O(ring) here, not O(idle time).
        for i in range(min(steps, BUCKETS_PER_RATE_WINDOW + 1)):
            self._push(self.cur if i == 0 else 0)
            self._sample(self.idx + i + 1, cfg)
        self.cur = 0
        self.idx = idx

    def _push(self, count: int) -> None:
        if len(self.ring) == self.ring.maxlen:
            self.total -= self.ring[0]
        self.ring.append(count)
        self.total += count

    def _sample(self, edge: int, cfg: PolicyConfig) -> None:
        self.rate = self.total / cfg.rate_window_s
        if self.rate > cfg.promote_rps:
            if self.above_from is None:
                self.above_from = edge
        else:
            self.above_from = None
        if self.rate < cfg.demote_rps:
            if self.below_from is None:
                self.below_from = edge
        else:
            self.below_from = None

    def above_for(self, buckets: int) -> bool:
        return self.above_from is not None and self.idx - self.above_from >= buckets

    def below_for(self, buckets: int) -> bool:
        return self.below_from is not None and self.idx - self.below_from >= buckets

    @property
    def idle(self) -> bool:
        return self.cur == 0 and self.total == 0


class PathPolicy:
    """The routing decisions, pure and deterministic: time comes in as ``now`` (seconds).

    Not thread-safe; ``PolicyState`` serializes calls by being a (synchronous) Ray actor.
    """

    def __init__(self, config: PolicyConfig):
        self.config = config
        self._static = frozenset(config.hot_tenants)
        self._trackers: dict[str, _RateTracker] = {}
        self._entries: dict[str, _Entry] = {}
        self._cooldown_until: dict[str, float] = {}
        self._versions: dict[str, int] = {}  # newest version routers reported per tenant
        self._owners: dict[str, str] = {}  # tenant (adapter) -> the API-key tenant last reported for it
        self._now = -math.inf  # latest time seen; the default for mark_* calls
        self.counters = {"promotions": 0, "demotions": 0, "failures": 0, "version_updates": 0}

    # -- inputs ---------------------------------------------------------------------------

    def record(
        self, tenant: str, now: float, n: int = 1, version: int | None = None, owner: str | None = None
    ) -> None:
        """Count ``n`` requests for ``tenant`` at ``now``, resolved to ``version`` (None: unknown),
        sent by API-key tenant ``owner`` (None: unknown, the adapter is its own owner)."""
        if version is not None and version > self._versions.get(tenant, -1):
            self._versions[tenant] = version
        if owner is not None:
            self._owners[tenant] = owner
        if n <= 0:
            return
        self._tick(now)
        idx = self._bucket(now)
        tracker = self._trackers.get(tenant)
        if tracker is None:
            tracker = self._trackers[tenant] = _RateTracker(idx)
        else:
            tracker.advance(idx, self.config)
        tracker.add(n)

    def mark_ready(self, tenant: str, now: float | None = None, *, version: int | None = None) -> bool:
        """The tenant's merged replica of ``version`` serves: route it there.

        False if it was not warming, or is warming another version (a newer one arrived while
        this copy was built): the copy is the caller's to unload."""
        entry = self._entries.get(tenant)
        if entry is None or entry.state != "warming" or not self._same_version(entry, version):
            # A late report for a promotion that was since demoted, failed or superseded by a
            # newer version: routing it traffic now would undo that decision.
            logger.info("policy: ignoring ready for %s v%s (state %s, v%s)", tenant, version,
                        entry and entry.state, entry and entry.version)
            return False
        if version is not None:
            entry.version = version
        entry.state, entry.since, entry.failures = "ready", self._at(now), 0
        logger.info("policy: %s now served by its merged replica (v%s)", tenant, entry.version)
        return True

    def mark_failed(
        self, tenant: str, reason: str, now: float | None = None, *, version: int | None = None
    ) -> bool:
        """The merged replica could not be built (or broke): keep the tenant on LoRA.

        False if the tenant was not warming or ready (nothing to fail), or holds another version."""
        entry = self._entries.get(tenant)
        if entry is None or entry.state not in ("warming", "ready") or not self._same_version(entry, version):
            logger.info("policy: ignoring failure for %s (state %s): %s", tenant, entry and entry.state, reason)
            return False
        if version is not None:
            entry.version = version
        t = self._at(now)
        entry.failures += 1
        backoff = self.config.cooldown_s * min(2 ** (entry.failures - 1), MAX_FAILURE_BACKOFF)
        entry.state, entry.since, entry.reason, entry.retry_at = "failed", t, reason, t + backoff
        self._cooldown_until[tenant] = t + backoff
        self.counters["failures"] += 1
        logger.warning(
            "policy: merged replica for %s failed (%d in a row), staying on LoRA, retry after %.0f s: %s",
            tenant, entry.failures, backoff, reason,
        )
        return True

    def mark_demoted(self, tenant: str, now: float | None = None) -> bool:
        """The tenant's merged replica is unloaded. False if there was none to unload.

        Also accepted for a warming or ready tenant whose replica went away outside the
        policy: it then starts a cooldown, as a demotion would."""
        entry = self._entries.get(tenant)
        if entry is None or entry.state == "failed":
            return False
        if entry.state != "demoting":
            self._cooldown_until[tenant] = self._at(now) + self.config.cooldown_s
        del self._entries[tenant]
        return True

    # -- decisions ------------------------------------------------------------------------

    def decide(self, now: float) -> list[Action]:
        """The changes to start now; each one is already applied to the policy's state."""
        self._tick(now)
        cfg = self.config
        idx = self._bucket(now)
        for tracker in self._trackers.values():
            tracker.advance(idx, cfg)
        self._prune(now)

        actions: list[Action] = self._decide_versions(now)
        for tenant in cfg.hot_tenants:  # config order: deterministic
            entry = self._entries.get(tenant)
            if (entry is None or entry.state == "failed") and not self._cooling(tenant, now):
                actions.append(self._promote(tenant, now, "static hot tenant", static=True))
        if cfg.dynamic:
            actions += self._decide_dynamic(now)
        return actions

    def _decide_dynamic(self, now: float) -> list[Action]:
        cfg = self.config
        actions: list[Action] = []
        dynamic = {t: e for t, e in self._entries.items() if not e.static}

        for tenant, entry in sorted(dynamic.items()):
            tracker = self._trackers.get(tenant)
            quiet = tracker is None or tracker.below_for(cfg.window_buckets)
            if entry.state == "ready" and quiet and not self._cooling(tenant, now):
                rate = tracker.rate if tracker else 0.0
                actions.append(
                    self._demote(tenant, now, f"rate {rate:.2f} rps below {cfg.demote_rps} for {cfg.window_s:g} s")
                )

        candidates = sorted(
            (
                (tracker.rate, tenant)
                for tenant, tracker in self._trackers.items()
                if tenant not in self._static
                and (tenant not in self._entries or self._entries[tenant].state == "failed")
                and tracker.above_for(cfg.window_buckets)
                and not self._cooling(tenant, now)
            ),
            key=lambda c: (-c[0], c[1]),  # hottest first; name breaks ties for determinism
        )
        held = self._slots_by_owner()
        free = max(0, cfg.max_merged_tenants - sum(held.values()))
        waiting = []
        for rate, tenant in candidates:
            owner = self.owner(tenant)
            if free and held.get(owner, 0) < cfg.max_merged_per_owner:
                actions.append(
                    self._promote(tenant, now, f"rate {rate:.2f} rps above {cfg.promote_rps} for {cfg.window_s:g} s",
                        static=False,
                    )
                )
                held[owner] = held.get(owner, 0) + 1
                free -= 1
            else:
                waiting.append((rate, tenant, owner))

        # Full: a waiting candidate may push out a merged tenant that has cooled below the
        # promote threshold, hottest candidate against coldest victim; one whose owner is at its
        # cap only its own owner's (another owner's slot would not become its). The candidate is
        # promoted by a later decide(), once the victim's replica is unloaded and its slot really free.
        victims = sorted(
            (self._rate(t), t)
            for t, e in self._entries.items()
            if not e.static and e.state == "ready" and not self._cooling(t, now)
            and self._rate(t) <= cfg.promote_rps
        )
        for rate, tenant, owner in waiting:
            capped = held.get(owner, 0) >= cfg.max_merged_per_owner
            pick = next((v for v in victims if not capped or self.owner(v[1]) == owner), None)
            if pick is None or rate <= pick[0]:
                continue
            victims.remove(pick)
            victim_rate, victim = pick
            actions.append(
                self._demote(victim, now, f"preempted by {tenant} ({rate:.2f} rps > {victim_rate:.2f} rps)")
            )
        return actions

    def owner(self, tenant: str) -> str:
        """The API-key tenant whose slots ``tenant`` (an adapter ID) counts against."""
        return self._owners.get(tenant, tenant)

    def _slots_by_owner(self) -> dict[str, int]:
        """Dynamic slots held (warming, ready or demoting) per owner."""
        held: dict[str, int] = {}
        for tenant, e in self._entries.items():
            if not e.static and e.state != "failed":
                held[self.owner(tenant)] = held.get(self.owner(tenant), 0) + 1
        return held

    def _decide_versions(self, now: float) -> list[Action]:
        """Re-warm every warming or ready tenant whose routers now resolve a newer version."""
        actions = []
        for tenant, entry in sorted(self._entries.items()):
            latest = self._versions.get(tenant)
            if entry.state not in ("warming", "ready") or entry.version is None or latest is None:
                continue
            if latest > entry.version:
                previous = entry.version
                reason = f"new version v{latest} (merged copy held v{previous})"
                entry.state, entry.since, entry.reason, entry.version = "warming", now, reason, latest
                self.counters["version_updates"] += 1
                logger.info("policy: %s: %s; LoRA path until the new copy is ready", tenant, reason)
                actions.append(Action("promote", tenant, reason, version=latest, previous=previous))
        return actions

    def _promote(self, tenant: str, now: float, reason: str, *, static: bool) -> Action:
        prev = self._entries.get(tenant)
        version = self._versions.get(tenant, prev.version if prev else None)
        self._entries[tenant] = _Entry(
            "warming", now, reason, static, failures=prev.failures if prev else 0, version=version
        )
        self._cooldown_until[tenant] = now + self.config.cooldown_s
        self.counters["promotions"] += 1
        logger.info("policy: promoting %s (v%s): %s", tenant, version, reason)
        return Action("promote", tenant, reason, version=version)

    def _demote(self, tenant: str, now: float, reason: str) -> Action:
        entry = self._entries[tenant]
        entry.state, entry.since, entry.reason = "demoting", now, reason
        self._cooldown_until[tenant] = now + self.config.cooldown_s
        self.counters["demotions"] += 1
        logger.info("policy: demoting %s: %s", tenant, reason)
        return Action("demote", tenant, reason, version=entry.version)

    # -- outputs --------------------------------------------------------------------------

    def route(self, tenant: str) -> Path:
        """"merged" only once the merged replica reported ready; "lora" in every other state."""
        entry = self._entries.get(tenant)
        return "merged" if entry is not None and entry.state == "ready" else "lora"

    def routes(self) -> dict[str, Path]:
        """The tenants routed to a merged replica; anyone absent goes to LoRA."""
        return {t: "merged" for t, e in self._entries.items() if e.state == "ready"}

    def ready_table(self) -> dict[str, str]:
        """Tenant -> multiplexed ID (``<id>@v<n>``) of its ready merged copy. A router sends a
        request to the merged path only if it resolved exactly that ID; any other version
        (newer or older) goes to the LoRA path."""
        return {t: mux_id(t, e.version) for t, e in self._entries.items()
                if e.state == "ready" and e.version is not None}

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view for the admin endpoint."""
        cfg = self.config
        tenants = {}
        for tenant, e in sorted(self._entries.items()):
            tenants[tenant] = {
                "state": e.state,
                "since": e.since,
                "reason": e.reason,
                "rps": round(self._rate(tenant), 3),
                "static": e.static,
                "failures": e.failures,
                "retry_at": e.retry_at if e.state == "failed" else None,
                "route": self.route(tenant),
                "version": e.version,
                "latest_version": self._versions.get(tenant),
                "owner": self.owner(tenant),
            }
        return {
            "now": self._now if math.isfinite(self._now) else None,
            "tenants": tenants,
            "dynamic_slots": {
                "used": sum(1 for e in self._entries.values() if not e.static and e.state != "failed"),
                "max": cfg.max_merged_tenants,
                "max_per_owner": cfg.max_merged_per_owner,
                "by_owner": dict(sorted(self._slots_by_owner().items())),
            },
            "tracked_tenants": len(self._trackers),
            "counters": dict(self.counters),
            "config": cfg.model_dump(),
        }

    # -- helpers --------------------------------------------------------------------------

    def _bucket(self, now: float) -> int:
        return math.floor(now / self.config.bucket_s)

    def _tick(self, now: float) -> None:
        self._now = max(self._now, now)

    def _at(self, now: float | None) -> float:
        if now is not None:
            self._tick(now)
            return now
        return self._now if math.isfinite(self._now) else 0.0

    def _rate(self, tenant: str) -> float:
        tracker = self._trackers.get(tenant)
        return tracker.rate if tracker else 0.0

    @staticmethod
    def _same_version(entry: _Entry, version: int | None) -> bool:
        # None on either side: not resolved yet (static at start) or a caller without versions.
        return version is None or entry.version is None or entry.version == version

    def _cooling(self, tenant: str, now: float) -> bool:
        return now < self._cooldown_until.get(tenant, -math.inf)

    def _prune(self, now: float) -> None:
        # Keep memory proportional to active tenants: an idle tenant has no run in progress
        # that a tracker would need to remember, except a merged one waiting to be demoted.
        for tenant in [t for t, tr in self._trackers.items() if tr.idle]:
            entry = self._entries.get(tenant)
            if entry is None or entry.state == "failed":
                del self._trackers[tenant]
        for tenant in [t for t in self._versions if t not in self._trackers and t not in self._entries]:
            del self._versions[tenant]
        for tenant in [t for t in self._owners if t not in self._trackers and t not in self._entries]:
            del self._owners[tenant]
        for tenant in [t for t, until in self._cooldown_until.items() if now >= until]:
            del self._cooldown_until[tenant]
        # A failure stays visible until it could be retried and the tenant has gone quiet.
        for tenant in [
            t for t, e in self._entries.items()
            if e.state == "failed" and not e.static and t not in self._trackers
            and e.retry_at is not None and now >= e.retry_at
        ]:
            del self._entries[tenant]


class PolicyState:
    """One ``PathPolicy`` shared by every router replica, as a named Ray actor.

    Methods default ``now`` to this actor's wall clock so that replicas on different hosts
    share one clock; pass ``now`` only in tests. Use ``get_or_create_policy_actor``.
    """

    def __init__(self, config: PolicyConfig | dict[str, Any]):
        self._policy = PathPolicy(PolicyConfig.model_validate(config))

    def record_batch(
        self, counts: dict[str, int], now: float | None = None, owners: dict[str, str] | None = None
    ) -> dict[str, Path]:
        """Add a router's request counts since its last flush, keyed by the multiplexed ID each
        request resolved to (``<id>@v<n>``; a bare ID is version 0), with the API-key tenant that
        sent most of them (``owners``, same keys; missing: unknown); returns ``routes()``."""
        t = self._now(now)
        owners = owners or {}
        for mux, n in counts.items():
            tenant, version = parse_mux_id(mux)
            self._policy.record(tenant, t, n, version=version, owner=owners.get(mux))
        return self._policy.routes()

    def sync(
        self, counts: dict[str, int], now: float | None = None, owners: dict[str, str] | None = None
    ) -> dict[str, str]:
        """``record_batch``, returning ``ready_table()``: one round trip both reports a router's
        counts and refreshes its table of which version each merged copy holds."""
        self.record_batch(counts, now, owners)
        return self._policy.ready_table()

    def decide(self, now: float | None = None) -> list[Action]:
        return self._policy.decide(self._now(now))

    def mark_ready(self, tenant: str, now: float | None = None, *, version: int | None = None) -> bool:
        return self._policy.mark_ready(tenant, self._now(now), version=version)

    def mark_failed(self, tenant: str, reason: str, now: float | None = None, *, version: int | None = None) -> bool:
        return self._policy.mark_failed(tenant, reason, self._now(now), version=version)

    def mark_demoted(self, tenant: str, now: float | None = None) -> bool:
        return self._policy.mark_demoted(tenant, self._now(now))

    def route(self, tenant: str) -> Path:
        return self._policy.route(tenant)

    def routes(self) -> dict[str, Path]:
        return self._policy.routes()

    def ready_table(self) -> dict[str, str]:
        return self._policy.ready_table()

    def snapshot(self) -> dict[str, Any]:
        return self._policy.snapshot()

    def config(self) -> dict[str, Any]:
        return self._policy.config.model_dump()

    @staticmethod
    def _now(now: float | None) -> float:
        return time.time() if now is None else now


def get_or_create_policy_actor(
    config: PolicyConfig,
    name: str = POLICY_ACTOR_NAME,
    *,
    namespace: str = POLICY_NAMESPACE,
    detached: bool = False,
):
    """A handle to the named ``PolicyState`` actor, created with ``config`` if it does not exist.

    Every caller with the same ``name`` and ``namespace`` gets the same actor (the first
    caller's config wins; later configs are ignored). The fixed namespace lets Serve
    replicas (namespace "serve") and an admin driver find the same actor. ``num_cpus=0``:
    it does bookkeeping only and must not take a CPU from a model replica.

    Not detached by default, so it dies with its creator and a redeploy starts fresh; the
    next caller then creates a new one with empty state, which routes everyone to LoRA.
    """
    import ray  # lazy: importing this module must not need Ray

    opts: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True}
    if detached:
        opts["lifetime"] = "detached"
    return ray.remote(num_cpus=0)(PolicyState).options(**opts).remote(config)
