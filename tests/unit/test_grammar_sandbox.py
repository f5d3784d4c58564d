"""Schema compiles out of a tenant's reach (engine/structured.py, engine/grammar_worker.py): a
schema built to compile for a long time gets a 400 at the compile limit while other tenants'
schemas and requests go on; a refusal is remembered; compiles never take the default executor's
threads; a tenant has one cache miss compiling at a time; the memory limit holds; the time limit
is CPU time (a starved compile is a 503, not a remembered 400); a compiled grammar reaches its
own submit even if evicted meanwhile; a dead worker is replaced.

The schemas here go to the engine directly: the edge (api/structured.py) would refuse SLOW
before it got here, and these tests are about what happens to whatever passes the edge."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_app.api.sampling_params import SamplingParams
from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.grammar_worker import wall_limit
from serve_app.engine.structured import GrammarUnavailableError
from serve_app.errors import InvalidRequestError

LIMIT_S = 0.5
# Nested bounded repetition: ~1.3 s to compile alone at this vocab (512), minutes at 16k.
SLOW_PATTERN = "^(([a-z0-9]{1,36}-){1,36}[a-z]{1,36}\\.){1,36}$"


def slow(i: int = 0) -> str:
    return json.dumps({"type": "object", "title": f"slow{i}", "required": ["x"],
                       "properties": {"x": {"type": "string", "pattern": SLOW_PATTERN}}})


def trivial(name: str) -> str:
    return json.dumps({"type": "object", "properties": {name: {"type": "integer"}}, "required": [name]})


@pytest.fixture(scope="module")
def eng(tiny_assets):
    e = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=8,
                                structured_output_compile_timeout_s=LIMIT_S, structured_output_compile_workers=2))
    for f in e.grammars().warm():  # both workers started: timings below are compiles, not starts
        f.result()
    e.generate_batch([([1, 2], SamplingParams(max_tokens=2), None),  # the engine's first steps, out of the timings
                      ([1, 2], SamplingParams(max_tokens=2, json_schema=trivial("warm")), None)])
    yield e
    e.grammars().close()
    e.shutdown()


def _timed(coro, t0: float):
    async def run():
        try:
            return await coro, time.perf_counter() - t0
        except Exception as e:
            return e, time.perf_counter() - t0
    return asyncio.ensure_future(run())


async def _schema_request(eng, tenant: str, schema: str) -> tuple[float, str]:
    """What a deployment does: compile_grammar, then submit. (Seconds the compile took, the text.)"""
    t = time.perf_counter()
    await eng.compile_grammar(schema, tenant)
    compile_s = time.perf_counter() - t
    stream = eng.submit([1, 5, 9], SamplingParams(max_tokens=24, temperature=0.0, json_schema=schema), tenant=tenant)
    text = ""
    try:
        async for out in stream:
            text += out.text
    finally:
        stream.close()
    return compile_s, text


async def _plain_request(eng) -> str:
    text = ""
    async for out in eng.generate([1, 7, 3], SamplingParams(max_tokens=8, temperature=0.0)):
        text += out.text
    return text


def test_a_slow_schema_gets_a_400_at_the_limit_beside_other_tenants(eng):
    cache = eng.grammars()

    async def run():
        t0 = time.perf_counter()
        attacker = _timed(eng.compile_grammar(slow(0), "mallory"), t0)
        await asyncio.sleep(0.05)  # its compile is running
        t1 = time.perf_counter()
        victim = _timed(_schema_request(eng, "alice", trivial("a")), t1)
        plain = _timed(_plain_request(eng), t1)
        return await attacker, await victim, await plain

    (err, attacker_s), ((compile_s, text), _), (plain_text, plain_s) = asyncio.run(run())
    assert isinstance(err, InvalidRequestError), err
    assert f"longer than {LIMIT_S:g} s" in err.message and "structured_output_compile_timeout_s" in err.message
    assert err.status_code == 400 and "simplify the schema" in err.message
    # The limit is CPU time; by the clock, at most wall_limit on a busy box (~LIMIT_S on an idle one).
    assert attacker_s < wall_limit(LIMIT_S), f"the attacker's 400 took {attacker_s:.2f} s (limit {LIMIT_S} s)"
    assert compile_s < LIMIT_S, f"another tenant's trivial schema took {compile_s:.2f} s to compile beside the slow one"
    assert 0.05 + compile_s < attacker_s, "the other tenant's compile waited for the attacker's"
    assert text.startswith('{"a": '), text  # and its request ran, constrained
    assert isinstance(plain_text, str) and plain_text, (plain_text, plain_s)  # a plain request beside it too

    # Remembered: a repeat is refused at once, with no compile tried.
    refusals = cache.refusals

    async def again():
        t = time.perf_counter()
        with pytest.raises(InvalidRequestError, match="longer than"):
            await eng.compile_grammar(slow(0), "mallory")
        return time.perf_counter() - t

    assert asyncio.run(again()) < 0.05 and cache.refusals == refusals
    with pytest.raises(InvalidRequestError, match="longer than"):  # the engine's own path (add_request) too
        eng.add_request("x", SamplingParams(max_tokens=2, json_schema=slow(0)), None, lambda out: None)


def test_compiles_never_take_the_default_executor(eng):
    """A deployment's adapter fetch / parse / registry reads use asyncio.to_thread: compiles
    waiting or running must not hold its threads (a no-op waited 2.6 s behind schema compiles)."""

    async def run():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=4))
        tasks = [asyncio.ensure_future(eng.compile_grammar(slow(10 + i), f"t{i}")) for i in range(6)]
        await asyncio.sleep(0.1)
        t = time.perf_counter()
        await asyncio.to_thread(lambda: None)
        noop = time.perf_counter() - t
        return noop, await asyncio.gather(*tasks, return_exceptions=True)

    noop, results = asyncio.run(run())
    assert noop < 0.3, f"a no-op to_thread waited {noop:.2f} s behind compiles"
    assert all(isinstance(r, InvalidRequestError) for r in results), results


def test_one_cache_miss_compiling_per_tenant(eng):
    """Mallory's second new schema waits for her first (it would otherwise take the second
    worker); Bob's is not held by either; the same schema asked at once compiles once."""
    cache = eng.grammars()

    async def run():
        t0 = time.perf_counter()
        first = _timed(eng.compile_grammar(slow(20), "mallory"), t0)
        await asyncio.sleep(0.05)
        second = _timed(eng.compile_grammar(trivial("m2"), "mallory"), t0)
        bob = _timed(eng.compile_grammar(trivial("b"), "bob"), t0)
        before = cache.compiles
        same = [_timed(eng.compile_grammar(trivial("c"), tenant), t0) for tenant in ("carol", "carol", "dave")]
        done = await asyncio.gather(first, second, bob, *same)
        return done, cache.compiles - before

    ((err, first_s), (_, second_s), (_, bob_s), *same), compiled = asyncio.run(run())
    assert isinstance(err, InvalidRequestError)
    assert bob_s < first_s, f"bob ({bob_s:.2f} s) waited for mallory's compile ({first_s:.2f} s)"
    assert second_s > first_s, f"mallory's second miss ({second_s:.2f} s) ran beside her first ({first_s:.2f} s)"
    assert cache.has(trivial("m2")) and cache.has(trivial("c"))
    assert compiled == 3, "the same schema asked three times at once compiled more than once"  # m2, b, c


def test_the_memory_limit_refuses_a_schema(eng):
    cache = eng.grammars()
    timeout, memory = cache.timeout_s, cache.memory_bytes
    cache.timeout_s, cache.memory_bytes = 20.0, 16 << 20  # read per compile
    try:
        big = json.dumps({"type": "string", "pattern": "^(([a-z0-9]{1,30}-){1,30}[a-z]{1,30}\\.){1,30}$"})
        t = time.perf_counter()
        with pytest.raises(InvalidRequestError, match="needs more than 16 MiB to compile") as e:
            cache.compiled(big)
        assert "structured_output_compile_memory_bytes" in e.value.message and time.perf_counter() - t < 20
        assert cache.refused(big) is not None
    finally:
        cache.timeout_s, cache.memory_bytes = timeout, memory


def test_a_compiled_grammar_reaches_its_submit_even_if_evicted(eng):
    """compile_grammar and submit may be an adapter load apart; another tenant's compiles
    meanwhile may evict the grammar from the LRU: submit still finds it (no compile on the loop)."""
    cache = eng.grammars()
    entries = cache.max_entries
    cache.max_entries = 1

    async def run():
        compiled, evicted = asyncio.Event(), asyncio.Event()

        async def tenant_a():
            await eng.compile_grammar(trivial("e1"), "alice")
            compiled.set()
            await evicted.wait()  # e.g. an adapter load
            n = cache.compiles
            stream = eng.submit([1, 2], SamplingParams(max_tokens=8, temperature=0.0, json_schema=trivial("e1")))
            stream.close()
            return cache.compiles - n

        async def tenant_b():
            await compiled.wait()
            await eng.compile_grammar(trivial("e2"), "bob")
            evicted.set()

        extra, _ = await asyncio.gather(tenant_a(), tenant_b())
        return extra

    try:
        extra = asyncio.run(run())
        assert extra == 0, "submit compiled the schema again"
        assert not cache.has(trivial("e1")), "precondition: the grammar was evicted"
    finally:
        cache.max_entries = entries


def _busy_children(parents: set[int], cpu_s: float) -> list[int]:
    """Children of ``parents`` that have used at least ``cpu_s`` of CPU (a compile running, not
    the idle spare each worker keeps forked)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if (int(fields[1]) in parents and fields[0] in "RSD"  # not a killed one not yet reaped
                    and (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") >= cpu_s):
                out.append(int(d))
    return out


def test_a_compile_starved_by_a_busy_box_is_a_503_not_a_remembered_refusal(eng, monkeypatch):
    """The limit is CPU time: a child that got no CPU (stopped here, as if the box were saturated)
    is called off at the wall limit as "busy, retry" (503), and its schema is not remembered as
    refused: with CPU it gets its 400 for what it is."""
    from serve_app.engine import structured

    cache = eng.grammars()
    monkeypatch.setattr(structured, "wall_limit", lambda t: 1.5)
    # A CPU limit far above what the child can use before it is stopped: on a loaded box the
    # scan below may see it late, and at the fixture's 0.5 s it could already have been refused.
    monkeypatch.setattr(cache, "timeout_s", 30.0)
    schema = slow(30)
    workers = {w.proc.pid for w in cache._workers}
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(cache.compiled, schema)
        deadline = time.monotonic() + 5
        while not (kids := _busy_children(workers, 0.05)) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert kids, "no compile child appeared"
        for pid in kids:
            os.kill(pid, signal.SIGSTOP)
        with pytest.raises(GrammarUnavailableError, match="too busy") as e:
            fut.result(timeout=30)
    assert e.value.status_code == 503 and cache.refused(schema) is None
    monkeypatch.setattr(cache, "timeout_s", LIMIT_S)
    with pytest.raises(InvalidRequestError, match="longer than"):
        cache.compiled(schema)


def test_a_dead_worker_is_replaced(eng):
    cache = eng.grammars()
    killed = {w.proc.pid for w in cache._workers}
    assert killed, "no compile worker process"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    cache.compiled(trivial("after_death"))  # not a refusal: the schema is not to blame
    assert cache.has(trivial("after_death")) and cache.refused(trivial("after_death")) is None
    live = {w.proc.pid for w in cache._workers if w.alive()}
    assert live and not live & killed
