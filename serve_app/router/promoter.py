"""Router-side glue of the path policy: count, sync with the shared policy, act on decisions.

Each router replica counts requests per tenant locally and, every ``interval_s``, flushes the
counts to the shared policy actor, gets back the table of merged tenants, and asks for
decisions. The policy hands each decision to exactly one caller, which carries it out:

- promote: build the merged copy (``warm`` on the merged deployment), then ``mark_ready``;
  the tenant stays on the LoRA path until then, so promotion never delays a request;
- demote: the policy already routes the tenant to LoRA; unload the merged copy, then
  ``mark_demoted``;
- a failed build is reported with ``mark_failed`` and its reason (admin endpoint, log).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from serve_app import metrics

logger = logging.getLogger("ray.serve")


class Promoter:
    def __init__(self, policy_actor, merged_handle, interval_s: float = 0.5):
        self.actor = policy_actor
        self.merged = merged_handle
        self.interval_s = interval_s
        self.routes: dict[str, str] = {}
        self._counts: Counter[str] = Counter()
        self._task: asyncio.Task | None = None
        self._jobs: set[asyncio.Task] = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None:
            self._task = loop.create_task(self._run())

    def path_for(self, adapter_id: str) -> str:
        """'merged' or 'lora' for this request, and count it toward the tenant's rate."""
        self.start(asyncio.get_running_loop())
        self._counts[adapter_id] += 1
        return self.routes.get(adapter_id, "lora")

    async def sync(self) -> None:
        counts, self._counts = dict(self._counts), Counter()
        self.routes = await self.actor.record_batch.remote(counts)
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

    async def _apply(self, action) -> None:
        tenant = action.tenant
        handle = self.merged.options(multiplexed_model_id=tenant)
        if action.kind == "promote":
            logger.info("promoting %s to the merged path: %s", tenant, action.reason)
            try:
                await handle.warm.remote()
            except Exception as e:
                from serve_app.router.ingress import unwrap

                reason = f"{type(unwrap(e)).__name__}: {getattr(unwrap(e), 'message', unwrap(e))}"
                logger.warning("merged copy of %s failed, it stays on the LoRA path: %s", tenant, reason)
                await self.actor.mark_failed.remote(tenant, reason)
                return
            if await self.actor.mark_ready.remote(tenant):
                metrics.PROMOTIONS.inc()
                self.routes = await self.actor.routes.remote()
        else:
            logger.info("demoting %s to the LoRA path: %s", tenant, action.reason)
            # The policy already routes it to LoRA; give every router a sync to learn that
            # before the merged copy goes, so no request lands on (and reloads) it.
            self.routes = await self.actor.routes.remote()
            await asyncio.sleep(2 * self.interval_s)
            try:
                await handle.unload.remote(tenant)
            except Exception:
                logger.exception("unloading the merged copy of %s failed; the LRU will free it", tenant)
            if await self.actor.mark_demoted.remote(tenant):
                metrics.DEMOTIONS.inc()
