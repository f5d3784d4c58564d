"""Fair admission: the waiting queue is round-robin across tenants (adapter IDs), FIFO within one."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from serve_app.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.scheduler import FairQueue
from serve_app.engine.sampling import SamplingParams


def req(tenant: str | None, i: int):
    adapter = None if tenant is None else SimpleNamespace(adapter_id=tenant)
    return SimpleNamespace(adapter=adapter, tenant=None, name=f"{tenant}-{i}")


def test_fair_queue_round_robin_and_fifo_within_a_tenant():
    q = FairQueue()
    assert not q and len(q) == 0
    for i in range(5):
        q.append(req("a", i))
    for i in range(2):
        q.append(req("b", i))
    q.append(req(None, 0))  # the base model is one tenant too
    assert len(q) == 8 and q.tenants() == 3
    assert [r.name for r in q] == ["a-0", "a-1", "a-2", "a-3", "a-4", "b-0", "b-1", "None-0"]
    order = [q.popleft().name for _ in range(4)]
    assert order == ["a-0", "b-0", "None-0", "a-1"]
    q.append(req("c", 0))  # a newcomer joins the back of the rotation
    q.append(req(None, 1))  # a tenant whose queue emptied rejoins at the back
    rest = []
    while q:
        rest.append(q.popleft().name)
    assert rest == ["b-1", "a-2", "c-0", "None-1", "a-3", "a-4"]
    with pytest.raises(IndexError):
        q.popleft()
    assert q.tenants() == 0


@pytest.fixture(scope="module")
def small_engine(tiny_assets):
    # Two rows: most requests wait, so the admission order is visible.
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=2, torch_threads=1))
    for aid in tiny_assets.adapter_ids[:3]:
        eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
    yield eng
    eng.shutdown()


def test_a_quiet_tenant_is_not_queued_behind_a_noisy_one(small_engine, tiny_assets):
    eng = small_engine
    noisy, quiet = tiny_assets.adapter_ids[:2]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first_token: list[str] = []  # request IDs in the order their first output arrived (= admission order)
    finished = threading.Semaphore(0)
    lock = threading.Lock()

    def sink_for(rid):
        seen = [False]

        def sink(out):
            with lock:
                if not seen[0]:
                    seen[0] = True
                    first_token.append(rid)
            if out.finished or out.error is not None:
                finished.release()

        return sink

    # Hold the engine thread so every request is queued before the first admission.
    gate, holding = threading.Event(), threading.Event()

    def hold():
        holding.set()
        gate.wait(30)

    holder = threading.Thread(target=eng.run_in_engine, args=(hold,))
    holder.start()
    assert holding.wait(30)
    ids = []
    for i in range(20):
        ids.append(f"noisy-{i}")
        eng.add_request([1, 5, 6, 7], params, noisy, sink_for(ids[-1]), request_id=ids[-1])
    ids.append("quiet-0")
    eng.add_request([1, 8, 9], params, quiet, sink_for("quiet-0"), request_id="quiet-0")
    ids.append("base-0")
    eng.add_request([1, 10, 11], params, None, sink_for("base-0"), request_id="base-0")
    stats = eng.stats()
    assert stats["waiting"] == 22 and stats["waiting_tenants"] == 3
    gate.set()
    holder.join(30)
    for _ in ids:
        assert finished.acquire(timeout=120)
    # FIFO would have admitted the quiet tenant's request 21st and the base request 22nd.
    assert first_token[:3] == ["noisy-0", "quiet-0", "base-0"], first_token[:5]
    # Within the noisy tenant, arrival order is kept.
    assert [r for r in first_token if r.startswith("noisy")] == [f"noisy-{i}" for i in range(20)]
    assert eng.stats()["waiting"] == 0 and eng.stats()["running"] == 0
