"""The engine deployments' request router: Serve's power-of-two choices, plus pinned channels.

Every call is routed as Serve's default router does (multiplexed model affinity first, then
locality, then the shorter of two random queues), except a stream ``channel(key, replica)``
(deployments/channel.py): it must reach the replica named in it, the one that runs the requests
whose text it carries, so it is offered that replica alone. If that replica is gone the call
goes anywhere and ends there at once (the replica checks the name); its requests' text then
rides in their last messages.

Built on Serve's public request-router API (``ray.serve.request_router``).
"""

from __future__ import annotations

import random
from typing import List, Optional

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

CHANNEL_METHOD = "channel"


def pinned_replica(request: PendingRequest | None) -> str | None:
    """The replica a ``channel(key, replica)`` call names, else None."""
    if request is None or request.metadata.call_method != CHANNEL_METHOD:
        return None
    if len(request.args) >= 2:
        return request.args[1]
    return request.kwargs.get("replica")


class EngineRequestRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Serve's default mixins, FIFO included. FIFO may hand a replica found for one request to an
    older pending one, so with several replicas a channel can land on another replica than the
    one it names; that replica refuses it, and the router reopens it (a few tries per request)
    while the requests' text still arrives complete in their last messages."""

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        target = pinned_replica(pending_request)
        if target is not None:
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            # Gone (died, scaled down): route it anywhere rather than not at all. A request that
            # cannot be routed holds one of the router's few routing tasks while it backs off,
            # and starves every other request of the deployment; the replica it lands on sees
            # that it is not the one named and ends the call at once.
            return [pinned] if pinned else ([list(candidate_replicas)] if candidate_replicas else [])
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        if not ids:
            return []
        by_id = {r.replica_id: r for r in candidate_replicas}
        chosen = [by_id[i] for i in random.sample(sorted(ids, key=str), k=min(2, len(ids))) if i in by_id]
        return [chosen] if chosen else []
