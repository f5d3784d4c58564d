"""The merged path follows the registry: copies keyed by ``<id>@v<n>``, built through the LoRA
path's adapter pipeline (registry versions, S3 + disk cache, the same validation settings),
retired when the manifest says deleted or stale, and routed only for the version they hold.

No Ray: MergedDeployment's load closure and reconcile run on a plain event loop, Serve's
multiplex LRU is stood in for where needed, and the promoter talks to fake handles.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import OrderedDict
from types import SimpleNamespace

import pytest

from serve_app.adapters.config import StoreConfig
from serve_app.adapters.registry import AdapterRegistry, Manifest
from serve_app.adapters.backends import open_store
from serve_app.deployments.lora import GenerateRequest
from serve_app.deployments.merged import MergedDeployment, stale_copies
from serve_app.engine.sampling import SamplingParams
from serve_app.errors import AdapterNotFoundError, InvalidAdapterError
from serve_app.router.path_policy import Action, PolicyState
from serve_app.router.promoter import Promoter
from tests.helpers import peft_model, reference_greedy

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [1, 40, 41, 42, 43]


@pytest.fixture
def make_dep(tiny_assets):
    def make(adapters: str, **store) -> MergedDeployment:
        return MergedDeployment({"base_model": str(tiny_assets.base), "adapters": adapters, "merged": True,
                                 "torch_threads": 1, "store": store})

    return make


@pytest.fixture
def base(tiny_assets):
    return tiny_assets


def _greedy(engine) -> list[int]:
    return engine.generate_batch([(PROMPT, GREEDY, None)])[0].token_ids


def _ref(tiny_assets, adapter_dir) -> list[int]:
    return reference_greedy(peft_model(tiny_assets.base, adapter_dir), PROMPT, GREEDY.max_tokens)


def _register(store_uri: str, adapter_id: str, src, cfg: StoreConfig | None = None) -> int:
    reg = AdapterRegistry(open_store(store_uri, cfg or StoreConfig()), cfg or StoreConfig())
    version = reg.read().next_version(adapter_id)
    info = reg.stage(adapter_id, version, str(src))
    reg.commit(adapter_id, version, info)
    return version


class _Built:
    """Holds the multiplexed object (its __del__ shuts the engine down) while a test uses it."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model.engine, name)

    def shutdown(self):
        self.model.__del__()


def _build(dep: MergedDeployment, mux: str) -> _Built:
    return _Built(asyncio.run(dep._load_fn(mux)))


# ---- the pipeline: registry versions, S3, validation settings ---------------------------------------


def test_registered_versions_are_merged_from_their_own_content(base, make_dep, tmp_path):
    """v1 and v2 of one ID are two copies, each with its own files (the old code read <root>/<id>)."""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copytree(base.adapter_path("tenant-0"), store / "hot")  # the hand-placed v0
    v1 = _register(str(store), "hot", base.adapter_path("tenant-1"))
    v2 = _register(str(store), "hot", base.adapter_path("tenant-2"))
    assert (v1, v2) == (1, 2)
    dep = make_dep(str(store))
    for mux, src in (("hot", "tenant-0"), ("hot@v1", "tenant-1"), ("hot@v2", "tenant-2")):
        engine = _build(dep, mux)
        try:
            assert _greedy(engine) == _ref(base, base.adapter_path(src)), mux
        finally:
            engine.shutdown()
    # An API-registered ID with no hand-placed folder at all is mergeable too.
    _register(str(store), "api-only", base.adapter_path("tenant-3"))
    engine = _build(dep, "api-only@v1")
    try:
        assert _greedy(engine) == _ref(base, base.adapter_path("tenant-3"))
    finally:
        engine.shutdown()


def test_s3_adapter_is_merged_through_the_disk_cache(base, make_dep, tmp_path):
    from tests.moto_s3 import S3Server

    s3 = S3Server().start()
    try:
        s3.create_bucket("merged")
        s3.upload_dir(base.adapter_path("tenant-4"), "merged", "adapters/s3-tenant")
        cache = tmp_path / "cache"
        dep = make_dep("s3://merged/adapters", storage_options=s3.storage_options, disk_cache_dir=str(cache))
        engine = _build(dep, "s3-tenant")
        try:
            assert _greedy(engine) == _ref(base, base.adapter_path("tenant-4"))
        finally:
            engine.shutdown()
        assert dep.fetcher.downloads == 1 and dep.fetcher.disk is not None
        assert dep.fetcher.disk.total_bytes() > 0
    finally:
        s3.stop()


def test_merge_uses_the_lora_paths_validation_settings(base, make_dep, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copytree(base.adapter_path("tenant-1"), store / "other-base")
    cfg_path = store / "other-base" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Some-Other-Model"
    cfg_path.write_text(json.dumps(cfg))

    refusing = make_dep(str(store), base_model_mismatch="refuse")
    with pytest.raises(InvalidAdapterError, match="other-base"):
        _build(refusing, "other-base")
    # The alias setting reaches the merge too: the same adapter is accepted under an alias.
    aliased = make_dep(str(store), base_model_mismatch="refuse", base_model_aliases=["Some-Other-Model"])
    _build(aliased, "other-base").shutdown()

    tiny_cap = make_dep(str(store), max_adapter_bytes=1024)
    with pytest.raises(InvalidAdapterError, match="1024"):
        _build(tiny_cap, "other-base")


def test_deleted_adapter_is_not_merged_again(base, make_dep, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    _register(str(store), "gone", base.adapter_path("tenant-1"))
    reg = AdapterRegistry(open_store(str(store), StoreConfig()), StoreConfig())
    dep = make_dep(str(store))
    reg.delete("gone", in_store=False)
    asyncio.run(dep.apply_manifest(reg.read()))
    with pytest.raises(AdapterNotFoundError, match="gone"):
        _build(dep, "gone@v1")
    with pytest.raises(AdapterNotFoundError, match="deleted"):
        asyncio.run(dep.resolve("gone"))


# ---- retiring copies ----------------------------------------------------------------------------


def _manifest(**adapters) -> Manifest:
    return Manifest(adapters={aid: {"current": cur, "next": nxt, "versions": {}} for aid, (cur, nxt) in adapters.items()})


def test_stale_copies_deleted_at_once_stale_after_the_grace():
    m = _manifest(a=(2, 3), gone=(None, 2), fresh=(1, 2))
    loaded = ["a@v1", "a@v2", "gone@v1", "fresh@v1", "unknown", "fresh@v5"]
    since: dict[str, float] = {}
    assert stale_copies(loaded, m, since, now=0.0, grace_s=3.0) == [("gone@v1", "deleted")]
    assert since == {"a@v1": 0.0}
    assert stale_copies(loaded, m, since, now=2.9, grace_s=3.0) == [("gone@v1", "deleted")]
    (retire,) = [r for r in stale_copies(loaded, m, since, now=3.0, grace_s=3.0) if r[0] != "gone@v1"]
    assert retire[0] == "a@v1" and "v2" in retire[1]
    # A copy no longer loaded is forgotten.
    stale_copies(["a@v2"], m, since, now=4.0, grace_s=3.0)
    assert since == {}


class _FakeModel:
    def __init__(self, log: list, mux: str):
        self.log, self.mux = log, mux

    def __del__(self):  # idempotent, like _MergedModel's (called again when collected)
        if self.log is not None:
            self.log.append(self.mux)
            self.log = None


def _fake_lru(dep: MergedDeployment, muxes: list[str]) -> list[str]:
    log: list[str] = []
    wrapper = SimpleNamespace(models=OrderedDict((m, _FakeModel(log, m)) for m in muxes),
                              _push_multiplexed_replica_info=False)
    setattr(dep._load_fn, "__serve_multiplex_wrapper", wrapper)
    return log


def test_reconcile_and_unload_retire_copies(base, make_dep, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    dep = make_dep(str(store), registry_refresh_s=0.5)
    assert dep.stale_grace_s == 2.0  # two refresh periods + two policy syncs
    freed = _fake_lru(dep, ["a@v1", "a@v2", "gone@v1", "b@v3", "c"])
    m = _manifest(a=(2, 3), gone=(None, 2), b=(3, 4), c=(0, 1))
    assert asyncio.run(dep.apply_manifest(m, now=10.0)) == ["gone@v1"]
    assert asyncio.run(dep.apply_manifest(m, now=12.0)) == ["a@v1"]
    assert freed == ["gone@v1", "a@v1"]
    assert list(dep._models()) == ["a@v2", "b@v3", "c"]
    assert asyncio.run(dep.unload("b", 2)) == []  # not the version it holds
    assert asyncio.run(dep.unload("b", None)) == ["b@v3"]
    # Loading a newer version first retires the older ones on this replica, freeing the slot.
    asyncio.run(dep._retire_older("a@v3"))
    assert list(dep._models()) == ["c"] and freed[-1] == "a@v2"
    assert dep.retired == ["gone@v1", "a@v1", "b@v3", "a@v2"]


# ---- the promoter: route only the version the copy holds; re-warm on a new version -----------------


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        async def call():
            return self.fn(*args, **kwargs)

        return call()


class _FakeActor:
    """PolicyState behind awaitable ``.remote`` calls, on a fake clock."""

    def __init__(self, state: PolicyState):
        self.state, self.now = state, 0.0
        for name in ("sync", "decide", "mark_ready", "mark_failed", "mark_demoted", "ready_table"):
            setattr(self, name, _Remote(self._call(name)))

    def _call(self, name):
        def fn(*args, **kwargs):
            if name in ("sync", "decide"):
                kwargs["now"] = self.now
            return getattr(self.state, name)(*args, **kwargs)

        return fn


class _FakeMerged:
    def __init__(self, current: str, fail: set[str] = frozenset()):
        self.calls: list[tuple] = []
        self.loaded: set[str] = set()
        self._mux = None
        self.current, self.fail = current, fail
        self.resolve = _Remote(lambda tenant: self.current)
        self.warm = _Remote(self._warm)
        self.unload = _Remote(self._unload)

    def options(self, multiplexed_model_id):
        self._mux = multiplexed_model_id
        return self

    def _warm(self):
        self.calls.append(("warm", self._mux))
        if self._mux in self.fail:
            raise InvalidAdapterError(f"adapter '{self._mux}': non-finite")
        self.loaded.add(self._mux)
        return self._mux

    def _unload(self, tenant, version):
        self.calls.append(("unload", tenant, version))
        self.loaded = {m for m in self.loaded if not (m.split("@")[0] == tenant and
                                                      (version is None or m == (f"{tenant}@v{version}" if version else tenant)))}
        return []


def test_promoter_routes_the_held_version_and_rewarms_an_update():
    async def run():
        actor = _FakeActor(PolicyState({"hot_tenants": ["vip"], "dynamic": False, "max_merged_tenants": 0,
                                        "promote_rps": 5.0, "demote_rps": 1.0}))
        merged = _FakeMerged(current="vip@v1")
        p = Promoter(actor, merged, interval_s=0.01)
        p._task = object()  # no background loop: the test calls sync() itself

        async def settle():
            await p.sync()
            while p._jobs:
                await asyncio.gather(*list(p._jobs))

        await settle()  # static tenant, not seen yet: resolved to v1, built, ready
        assert merged.calls == [("warm", "vip@v1")]
        assert p.table == {"vip": "vip@v1"}
        assert p.path_for("vip", "vip@v1") == "merged"
        # This router already resolves the update: the v1 copy must not answer for v2.
        assert p.path_for("vip", "vip@v2") == "lora"
        actor.now = 1.0
        await settle()  # counts reach the policy: re-warm v2, unloading v1 first
        assert merged.calls[1:] == [("unload", "vip", 1), ("warm", "vip@v2")]
        assert merged.loaded == {"vip@v2"}
        assert p.table == {"vip": "vip@v2"}
        assert p.path_for("vip", "vip@v2") == "merged"
        assert p.path_for("vip", "vip@v1") == "lora"  # a router that has not seen v2 yet
        snap = actor.state.snapshot()
        assert snap["tenants"]["vip"]["version"] == 2 and snap["counters"]["version_updates"] == 1

    asyncio.run(run())


def test_promoter_frees_a_copy_the_policy_no_longer_wants_and_reports_failures():
    async def run():
        actor = _FakeActor(PolicyState({"hot_tenants": ["vip"], "dynamic": False, "max_merged_tenants": 0}))
        merged = _FakeMerged(current="vip@v1", fail={"vip@v3"})
        p = Promoter(actor, merged, interval_s=0.01)
        # A build of v1 that finishes after v2 superseded it: not routed, and unloaded.
        actor.state.decide(now=0.0)
        actor.state.mark_ready("vip", now=0.0, version=1)
        actor.state.record_batch({"vip@v2": 1}, now=0.1)
        actor.state.decide(now=0.2)  # warming v2
        await p._promote(Action("promote", "vip", "late", version=1))
        assert ("unload", "vip", 1) in merged.calls and p.table == {}
        # A failed build of the current version is reported with its version.
        actor.state.record_batch({"vip@v3": 1}, now=0.3)
        actor.state.mark_ready("vip", now=0.3, version=2)
        (action,) = actor.state.decide(now=0.4)
        await p._promote(action)
        tenant = actor.state.snapshot()["tenants"]["vip"]
        assert tenant["state"] == "failed" and "vip@v3" in tenant["reason"] and tenant["version"] == 3

    asyncio.run(run())


def test_merged_generate_needs_a_multiplexed_id(base, make_dep, tmp_path):
    from serve_app.errors import InvalidRequestError

    dep = make_dep(str(tmp_path))

    async def run():
        with pytest.raises(InvalidRequestError, match="multiplexed_model_id"):
            await dep.generate(GenerateRequest(params=GREEDY, prompt=PROMPT))
        dep._reconciler.cancel()

    asyncio.run(run())


def test_promoter_reports_each_adapters_owner_with_its_counts():
    """The router knows which API-key tenant sent a request; the policy needs it to cap merged
    slots per owner (an adapter's owner: the tenant that sent most of its requests)."""
    async def run():
        state = PolicyState({"promote_rps": 5.0, "demote_rps": 1.0, "window_s": 1.0, "rate_window_s": 1.0,
                             "max_merged_tenants": 3})
        actor = _FakeActor(state)
        p = Promoter(actor, _FakeMerged(current="x@v1"), interval_s=0.01)
        p._task = object()  # no background loop: the test calls sync() itself
        for _ in range(3):
            p.path_for("acme-1", "acme-1@v2", owner="acme")
        p.path_for("acme-1", "acme-1@v2", owner="other")  # a second key allowed on the same adapter
        p.path_for("acme-2", None, owner="acme")
        p.path_for("open", "open@v1")  # auth off: no owner
        seen = []
        real = state.record_batch
        state.record_batch = lambda counts, now=None, owners=None: seen.append((counts, owners)) or real(
            counts, now, owners)
        await p.sync()
        assert seen == [({"acme-1@v2": 4, "acme-2": 1, "open@v1": 1}, {"acme-1@v2": "acme", "acme-2": "acme"})]
        assert state._policy.owner("acme-1") == state._policy.owner("acme-2") == "acme"
        assert state._policy.owner("open") == "open"
        await p.sync()  # counts were taken: nothing new
        assert seen[-1] == ({}, {})

    asyncio.run(run())


# ---- each deployment reads its own config (issue 26) ----------------------------------------------


def test_each_deployment_gets_its_own_config_from_the_app_config():
    """build_app binds ``AppConfig.lora_deployment_config()`` / ``merged_deployment_config()``; a
    dict of build_app's args (these tests' replicas) reads the same way, with the same defaults."""
    from pydantic import ValidationError

    from serve_app.config import AppConfig
    from serve_app.deployments.config import LoRADeploymentConfig, MergedDeploymentConfig

    custom = {"base_model": "/models/b", "adapters": "/adapters", "merged": True, "max_lora_rank": 16,
              "lora_num_cpus": 3, "merged_num_cpus": 2, "max_adapters_per_replica": 3,
              "merged_tenants_per_replica": 4, "merged_kernel_inject": False, "torch_threads": 5,
              "store": {"ram_cache_bytes": 0, "registry_refresh_s": 0.5}, "router_replicas": 2}
    for args in ({}, custom):
        app = AppConfig.model_validate(args)
        lora, merged = app.lora_deployment_config(), app.merged_deployment_config()
        assert lora == LoRADeploymentConfig.from_args(args) and merged == MergedDeploymentConfig.from_args(args)
        # One engine recipe: the replicas' engines are what AppConfig.engine_config says.
        assert lora.engine_config("/b") == app.engine_config("/b")
        assert merged.engine_config("/b") == app.engine_config("/b", num_cpus=app.merged_num_cpus)
    assert (lora.max_adapters_per_replica, merged.merged_tenants_per_replica, merged.merged_kernel_inject) == (3, 4, False)
    assert lora.engine_config("/b").torch_threads == 5 and lora.store.registry_refresh_s == 0.5
    assert LoRADeploymentConfig().engine_config("/b").torch_threads == 1  # ceil(lora_num_cpus 1.0)
    assert MergedDeploymentConfig(merged_num_cpus=2.5).engine_config("/b").torch_threads == 3
    for cls in (LoRADeploymentConfig, MergedDeploymentConfig):
        assert set(cls.model_fields) <= set(AppConfig.model_fields)  # AppConfig's fields, same names
        assert all(f.description for f in cls.model_fields.values())
        with pytest.raises(ValidationError, match="extra"):
            cls(lora_replicas=2)  # a deployment option, not something a replica reads
        with pytest.raises(ValidationError, match="frozen"):
            cls().base_model = "x"


def test_deployments_do_not_import_the_app_config():
    """The arrow back up that the deployment configs removed: deployments/ never imports
    serve_app.config (AppConfig builds their configs; app.py binds them)."""
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "serve_app" / "deployments"
    bad = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}:{node.lineno}" for n in names if n == "serve_app.config"]
    assert not bad, bad
