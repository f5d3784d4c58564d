"""Router-side glue of the path policy: count, sync with the shared policy, act on decisions.

Each router replica counts requests per multiplexed ID (``<id>@v<n>``, the version it resolved)
and per owner (the API-key tenant that sent them: the policy caps merged slots per owner, not per
adapter) locally and, every ``interval_s``, flushes the counts to the shared policy actor, gets
back the table of merged copies (tenant -> the version each holds), and asks for decisions. A request
goes to the merged path only when the version this router resolved is the one the tenant's
ready merged copy holds; any other version (an update this router already sees, or one it
does not see yet) goes to the LoRA path, which serves every version. The policy hands each
decision to exactly one caller, which carries it out:

- promote: build the merged copy of the action's version (``warm`` on the merged deployment;
  a static hot tenant not seen yet is first resolved to its current version by the merged
  deployment), then ``mark_ready``; the tenant stays on the LoRA path until then, so
  promotion never delays a request. A promote for a new version of a merged tenant names the
  ``previous`` version: its copy is no longer routed, and is unloaded (after every router had
  a sync to learn that) before the new one is built, so the two never compete for a slot;
- a copy whose ``mark_ready`` the policy refuses (demoted, failed or superseded meanwhile) is
  unloaded at once;
- demote: the policy already routes the tenant to LoRA; unload the merged copy, then
  ``mark_demoted``;
- a failed build is reported with ``mark_failed`` and its reason (admin endpoint, log).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from serve_app import metrics
from serve_app.adapters.registry import mux_id, parse_mux_id
from serve_app.errors import unwrap

logger = logging.getLogger("ray.serve")


def _reason(e: BaseException) -> str:
    err = unwrap(e)
    return f"{type(err).__name__}: {getattr(err, 'message', err)}"


class Promoter:
    def __init__(self, policy_actor, merged_handle, interval_s: float = 0.5):
        self.actor = policy_actor
        self.merged = merged_handle
        self.interval_s = interval_s
        self.table: dict[str, str] = {}  # tenant -> multiplexed ID of its ready merged copy
        self._counts: Counter[tuple[str, str | None]] = Counter()  # (mux, owner) -> requests
        self._task: asyncio.Task | None = None
        self._jobs: set[asyncio.Task] = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None:
            self._task = loop.create_task(self._run())

    def path_for(self, adapter_id: str, mux: str | None = None, owner: str | None = None) -> str:
        """'merged' or 'lora' for a request of ``adapter_id`` resolved to ``mux`` (``<id>@v<n>``;
        None: version 0) and sent by API-key tenant ``owner`` (None: unknown, e.g. auth off), and
        count it toward the adapter's rate and its owner's merged slots."""
        self.start(asyncio.get_running_loop())
        mux = mux or adapter_id
        self._counts[mux, owner] += 1
        return "merged" if self.table.get(adapter_id) == mux else "lora"

    def _take_counts(self) -> tuple[dict[str, int], dict[str, str]]:
        """(requests per mux, the owner that sent most of them per mux) since the last flush."""
        taken, self._counts = self._counts, Counter()
        counts: Counter[str] = Counter()
        for (mux, _), n in taken.items():
            counts[mux] += n
        owners: dict[str, str] = {}
        for (mux, owner), n in sorted(taken.items(), key=lambda kv: (-kv[1], kv[0][1] or "")):
            if owner is not None:
                owners.setdefault(mux, owner)
        return dict(counts), owners

    async def sync(self) -> None:
        counts, owners = self._take_counts()
        self.table = await self.actor.sync.remote(counts, owners=owners)
        for action in await self.actor.decide.remote():
            job = asyncio.get_running_loop().create_task(self._apply(action))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # the policy is an optimization: keep serving on LoRA meanwhile
                logger.exception("path policy sync failed; routing from the last known table")
            await asyncio.sleep(self.interval_s)

    async def _refresh(self) -> None:
        self.table = await self.actor.ready_table.remote()

    async def _unload(self, tenant: str, version: int | None, why: str, *, every_version: bool = False) -> None:
        """Unload ``tenant``'s copy of ``version`` (or all its copies) on the replica holding it."""
        mux = mux_id(tenant, version or 0)  # routes the call to the replica holding that copy
        try:
            await self.merged.options(multiplexed_model_id=mux).unload.remote(
                tenant, None if every_version else version)
        except Exception:
            logger.exception("unloading the merged copy of %s (%s) failed; the replica's reconcile or LRU frees it",
                             mux, why)

    async def _apply(self, action) -> None:
        if action.kind == "promote":
            await self._promote(action)
        else:
            await self._demote(action)

    async def _promote(self, action) -> None:
        tenant = action.tenant
        logger.info("promoting %s (v%s) to the merged path: %s", tenant, action.version, action.reason)
        if action.previous is not None:
            # The policy no longer routes the old copy; give every router a sync to learn that
            # before it goes, so no request lands on (and rebuilds) it.
            await self._refresh()
            await asyncio.sleep(2 * self.interval_s)
            await self._unload(tenant, action.previous, f"replaced by v{action.version}")
        try:
            mux = action.mux
            if mux is None:  # not seen by any router yet: the store's current version
                mux = await self.merged.resolve.remote(tenant)
            await self.merged.options(multiplexed_model_id=mux).warm.remote()
        except Exception as e:
            reason = _reason(e)
            logger.warning("merged copy of %s failed, it stays on the LoRA path: %s", tenant, reason)
            await self.actor.mark_failed.remote(tenant, reason, version=action.version)
            return
        version = parse_mux_id(mux)[1]
        if await self.actor.mark_ready.remote(tenant, version=version):
            metrics.PROMOTIONS.inc()
            await self._refresh()
            return
        # Demoted, failed or superseded while it was built: the copy is ours to free.
        await self._refresh()
        if self.table.get(tenant) != mux:
            await self._unload(tenant, version, "no longer wanted by the policy")

    async def _demote(self, action) -> None:
        tenant = action.tenant
        logger.info("demoting %s to the LoRA path: %s", tenant, action.reason)
        # The policy already routes it to LoRA; give every router a sync to learn that
        # before the merged copy goes, so no request lands on (and reloads) it.
        await self._refresh()
        await asyncio.sleep(2 * self.interval_s)
        await self._unload(tenant, action.version, "demoted", every_version=True)
        if await self.actor.mark_demoted.remote(tenant):
            metrics.DEMOTIONS.inc()
