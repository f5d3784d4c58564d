"""Forwarding: a request's engine requests to the replica that serves them, and their outputs back.

``_resolve`` (the model name -> its current version ``id@vN`` and the serving path, merged or
LoRA) -> ``_handle`` (that deployment's handle bound to the version, cached) -> ``_generate`` (a
whole result) or ``_generate_stream`` (text over the shared channel, router/streams.py; a request
that needs each token's data, logprobs or its echoed prompt, over its own stream).

Two rules hold for every call:

* A call whose replica died before it sent anything (killed, OOM) is retried once on another
  replica; a stream that has sent text is not (it would repeat text).
* A call the router stops waiting for (a sibling in the batch failed, the client went away) is
  cancelled on its replica and waited for (``streams.settle``), so the tenant's lease, held
  around the whole batch (``all_settled``), is not free while any of it still generates.

A mixin of the Router (router/ingress.py), as the deployments' ``ChannelMixin``: it reads the
router's ``lora``, ``merged``, ``admin``, ``promoter``, ``streams``, ``_handles`` and
``base_model_name``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator

from ray.serve.handle import DeploymentHandle

from serve_app import metrics
from serve_app.adapters.ids import validate_adapter_id
from serve_app.api.protocol import random_id
from serve_app.api.wire import GenerateRequest, RequestOutput
from serve_app.errors import unwrap
from serve_app.router.streams import settle

logger = logging.getLogger("ray.serve")

REPLICA_RETRIES = 1  # retries of a request whose replica died before it sent anything
MAX_CACHED_HANDLES = 4096  # one per (path, adapter version) in use: bounded anyway


async def all_settled(coros: list) -> list:
    """Run a batch's engine requests (prompts x n, best_of candidates, chat's n) together; their
    results in order.

    The first failure cancels the others and is raised only once every one of them has settled:
    each cancelled ``_generate`` cancels its call on its replica and waits for it to end there
    (streams.settle), so the tenant's lease, held around this, is not free while any of the
    batch still generates. Without this, a batch ``[bad prompt, 63 long prompts]`` got its 400 at
    once and left 63 sequences running outside the tenant's concurrency cap. The same holds when
    this task is cancelled (the client went away).
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
    failed = [t for t in tasks if not t.cancelled() and t.exception() is not None]  # each one retrieved
    if failed:
        raise next((t for t in failed if t in done), failed[0]).exception()  # the one that failed first
    return [t.result() for t in tasks]


def _replica_died(exc: BaseException) -> bool:
    from ray import exceptions as rex

    return isinstance(exc, (rex.ActorDiedError, rex.ActorUnavailableError))


class Forwarder:
    """The router's calls to its deployments (see the module docstring)."""

    def _resolve(self, model: str, header: str | None = None, tenant: str | None = None) -> tuple[str | None, str]:
        """(multiplexed model ID or None for the base model, serving path 'lora' | 'merged').

        On both paths the ID is the tenant's current version, ``<id>@v<n>`` (router/admin.py): the
        merged path serves it only if its ready copy holds exactly that version (router/promoter.py).
        ``tenant`` (the lease's: the API key's tenant, or the model with auth off) owns the request's
        count toward the path policy's merged slots, which are capped per owner.
        """
        name = header or model
        versioned = None
        if name == self.base_model_name:
            adapter_id = None
        else:
            validate_adapter_id(name)
            versioned = self.admin.resolve(name)  # 404 unknown or deleted, 503 store unreachable
            adapter_id = name
        path = (self.promoter.path_for(adapter_id, versioned, owner=tenant or name)
                if self.promoter is not None and adapter_id else "lora")
        metrics.ROUTER_PATH.inc(tags={"path": path})
        metrics.REQUESTS.inc(tags={"adapter": adapter_id or self.base_model_name, "path": path})
        return versioned, path

    def _handle(self, adapter_id: str | None, path: str, stream: bool) -> DeploymentHandle:
        """The deployment's handle configured for this adapter, cached: ``options()`` builds a new
        handle (and its routing state) on every call, per request, as Ray's LLM router notes too."""
        key = (path, adapter_id, stream)
        h = self._handles.get(key)
        if h is None:
            h = self.merged if path == "merged" else self.lora
            if adapter_id is not None:
                h = h.options(multiplexed_model_id=adapter_id)
            h = h.options(stream=True) if stream else h
            if len(self._handles) >= MAX_CACHED_HANDLES:
                self._handles.pop(next(iter(self._handles)))
            self._handles[key] = h
        return h

    async def _generate(self, adapter_id: str | None, path: str, req: GenerateRequest) -> RequestOutput:
        for attempt in range(REPLICA_RETRIES + 1):
            call = self._handle(adapter_id, path, stream=False).generate.remote(req)
            try:
                out = await call
                break
            except asyncio.CancelledError:
                # A sibling in the batch failed, or the client went away. Cancelling the task
                # that awaits a DeploymentResponse does not reach the replica: cancel() does.
                # Return (the lease is released) only once the replica has let go of it.
                await settle(call)
                raise
            except Exception as e:
                # Nothing has reached the client yet, so a request whose replica died under it
                # (killed, OOM) is retried on a live one instead of being lost.
                if attempt < REPLICA_RETRIES and _replica_died(e):
                    logger.warning("a %s replica died under a request; retrying it on another replica", path)
                    continue
                raise unwrap(e) from None
        metrics.GENERATED_TOKENS.inc(out.completion_tokens, tags={"adapter": adapter_id or self.base_model_name})
        return out

    async def _generate_stream(
        self, adapter_id: str | None, path: str, req: GenerateRequest
    ) -> AsyncIterator[RequestOutput]:
        t0 = time.perf_counter()
        req.request_id = req.request_id or random_id("req")  # the channel's key for this request's text
        first = True
        try:
            for attempt in range(REPLICA_RETRIES + 1):
                try:
                    if req.params.per_token_output:  # the request's own stream: a channel carries text only
                        source = self._direct_stream(adapter_id, path, req)
                    else:
                        source = self.streams.stream(self._handle(adapter_id, path, stream=False), path, req)
                    # aclosing: a consumer that closes this stream early (a sibling failed, the
                    # client left) closes the source too, at once, which aborts it on its replica;
                    # an abandoned generator would only be closed whenever it is collected.
                    async with contextlib.aclosing(source):
                        async for out in source:
                            if first:
                                metrics.TTFT.observe(time.perf_counter() - t0, tags={"path": path})
                                first = False
                            if out.finished:
                                metrics.GENERATED_TOKENS.inc(
                                    out.completion_tokens, tags={"adapter": adapter_id or self.base_model_name}
                                )
                            yield out
                    break
                except Exception as e:
                    # Only a stream that has sent nothing is retried: a started one would repeat text.
                    if first and attempt < REPLICA_RETRIES and _replica_died(e):
                        logger.warning("a %s replica died before a stream started; retrying it", path)
                        continue
                    raise
        except Exception as e:
            raise unwrap(e) from None
        finally:
            metrics.LATENCY.observe(time.perf_counter() - t0, tags={"path": path})

    async def _direct_stream(self, adapter_id: str | None, path: str, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """One Serve message per engine step's output: for requests that need each token's data
        (logprobs), which the channels (text only) do not carry."""
        call = self._handle(adapter_id, path, stream=True).generate_stream.remote(req)
        ended = False  # the call ended on the replica: its last output or its error came back
        try:
            async for out in call:
                ended = out.finished
                yield out
            ended = True
        except Exception:
            ended = True
            raise
        finally:
            if not ended:  # closed early (a sibling failed, the client left): abort it on the replica
                await settle(call)
