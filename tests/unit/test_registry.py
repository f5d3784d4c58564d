"""Registry integrity: a version number names one content, S3 writes never lose a race, reserved IDs.

Why these tests exist (issue 10, "Registry integrity"):

* An interrupted registration (client gone during validation) must not leave its number free:
  otherwise ``id@vN`` names two contents and the replicas' RAM / handoff / disk tiers answer a
  later registration with the first attempt's weights. Caches check the content fingerprint
  the manifest records, so even a reused location is never served stale.
* Two routers writing the manifest on S3 at once: one of them must not silently win (a lost
  tombstone resurrects a deleted adapter). Writes are conditional PUTs; a lost race retries on
  the fresh manifest or is a 409.
* ``manifest.json`` is a registry file name: as an adapter ID it broke every registry read.
* Errors that reach tenants name the adapter and the problem, never the store's URI or a path.

S3 runs against moto's server on 127.0.0.1 (tests/moto_s3.py), in this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from serve_app.adapters.config import StoreConfig
from serve_app.adapters.fetch import AdapterFetcher
from serve_app.adapters.ids import validate_adapter_id
from serve_app.adapters.registry import AdapterRegistry, Manifest, RegistryConflictError
from serve_app.adapters.backends import open_store
from serve_app.errors import (
    AdapterNotFoundError,
    AdapterStoreUnavailableError,
    InvalidAdapterError,
    InvalidRequestError,
    ServeAppError,
)
from tests.moto_s3 import S3Server

BUCKET = "bkt-integrity"
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


def _local_store(tmp_path: Path, tiny_assets, ids=("tenant-0", "tenant-1")) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    for i in ids:
        shutil.copytree(tiny_assets.adapter_path(i), root / i)
    return root


def _s3_prefix(s3, tiny_assets, ids=("tenant-0", "tenant-1"), srcs=(2, 3)) -> tuple[str, str]:
    """A fresh store prefix with hand-placed tenants, and a source prefix with tenant-k's files at /k."""
    prefix = f"p{time.monotonic_ns()}"
    for i in ids:
        s3.upload_dir(tiny_assets.adapter_path(i), BUCKET, f"{prefix}/{i}")
    for k in srcs:
        s3.upload_dir(tiny_assets.adapter_path(f"tenant-{k}"), BUCKET, f"{prefix}-src/{k}")
    return f"s3://{BUCKET}/{prefix}", f"s3://{BUCKET}/{prefix}-src"


def _digest(folder: Path) -> str:
    """The content fingerprint as the test understands it: sha256 over both files' digests."""
    h = hashlib.sha256()
    for name in FILES:
        h.update(name.encode() + b"\0" + hashlib.sha256((Path(folder) / name).read_bytes()).digest())
    return "sha256:" + h.hexdigest()


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class FakeLora:
    """The LoRA deployment handle as AdapterAdmin uses it; ``hook(adapter_id, version)`` may block."""

    def __init__(self, hook=None):
        self.hook = hook
        self.calls: list[tuple] = []
        self.validate_adapter = _Method(self._validate)
        self.warm = _Method(self._warm)
        self.refresh_registry = _Method(self._refresh)

    async def _validate(self, adapter_id, version, fingerprint=None):
        self.calls.append((adapter_id, version, fingerprint))
        if self.hook is not None:
            await self.hook(adapter_id, version)
        return {"rank": 8, "nbytes": 1, "raw_bytes": 1, "warnings": [], "tier": "disk", "seconds": 0.0}

    async def _warm(self):
        return {"warmed": True}

    async def _refresh(self):
        return []

    def options(self, **_):
        return self


def _admin(uri: str, cfg: StoreConfig, lora):
    from serve_app.router.admin import AdapterAdmin

    return AdapterAdmin(uri, cfg, lora=lora)


# ---- 1. a version number is never reused ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_interrupted_registration_never_reuses_its_version(backend, tmp_path, tiny_assets, request):
    if backend == "local":
        uri, cfg = str(_local_store(tmp_path, tiny_assets)), StoreConfig()
        src = tmp_path / "src"
        for k in (2, 3):
            shutil.copytree(tiny_assets.adapter_path(f"tenant-{k}"), src / str(k))
        src = str(src)
    else:
        s3 = request.getfixturevalue("s3")
        uri, src = _s3_prefix(s3, tiny_assets)
        cfg = StoreConfig(storage_options=s3.storage_options, disk_cache_dir=str(tmp_path / "cache"))
    started, hang = asyncio.Event(), asyncio.Event()

    async def hook(adapter_id, version):
        if len(lora.calls) == 1:  # the first attempt: the client goes away during validation
            started.set()
            await hang.wait()

    lora = FakeLora(hook)
    admin = _admin(uri, cfg, lora)
    try:
        async def run():
            first = asyncio.create_task(admin.register_adapter("tenant-0", f"{src}/2", warm=False))
            await asyncio.wait_for(started.wait(), 30)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            return await admin.register_adapter("tenant-0", f"{src}/3", warm=False)

        out = asyncio.run(run())
        first_version = lora.calls[0][1]
        assert out["version"] != first_version, (
            f"version v{first_version} was reused after an interrupted registration: tenant-0@v{first_version} "
            "now names two contents")
        reg = admin.registry
        m = reg.read()
        e = m.entry("tenant-0")
        assert m.current("tenant-0") == out["version"] == first_version + 1
        burnt = e["versions"][str(first_version)]
        assert burnt["state"] == "abandoned" and burnt["files"] is False and "interrupted" in burnt["abandoned"], burnt
        assert m.is_stale(f"tenant-0@v{first_version}")  # replicas drop what they parsed of it
        # The interrupted attempt's files are gone (once its cleanup, which outlives the cancel, ran).
        assert admin.store.list_files(reg.version_rel("tenant-0", first_version)) == {}
        # The manifest records the content fingerprint of what was validated, and the replica
        # was told which content to validate.
        fp = _digest(tiny_assets.adapter_path("tenant-3"))
        assert e["versions"][str(out["version"])]["fingerprint"] == fp
        assert lora.calls[1] == ("tenant-0", out["version"], fp)
        # The fetcher serves the new version's content (not the interrupted attempt's).
        got = AdapterFetcher(admin.store, cfg).fetch("tenant-0", out["version"])
        assert _digest(Path(got.path)) == fp and got.fingerprint == fp
    finally:
        admin.close()


def test_commit_refuses_a_version_that_is_no_longer_staging(tmp_path, tiny_assets):
    """An abandoned or refused number can never become current; an older one cannot replace a newer."""
    store = open_store(str(_local_store(tmp_path, tiny_assets)))
    reg = AdapterRegistry(store)
    src = str(tiny_assets.adapter_path("tenant-2"))
    v1, _ = reg.reserve("tenant-0", src)
    v2, _ = reg.reserve("tenant-0", src)
    assert (v1, v2) == (1, 2) and reg.read().entry("tenant-0")["versions"]["1"]["state"] == "staging"
    assert not reg.read().is_stale("tenant-0@v1")  # being validated: replicas keep their parsed copy
    reg.commit("tenant-0", v2, reg.stage("tenant-0", v2, src))
    info1 = reg.stage("tenant-0", v1, src)
    with pytest.raises(RegistryConflictError, match=r"newer version v2"):
        reg.commit("tenant-0", v1, info1)
    reg.abandon("tenant-0", v1, "registration interrupted")
    with pytest.raises(RegistryConflictError, match=r"v1 of 'tenant-0' was abandoned"):
        reg.commit("tenant-0", v1, info1)
    assert reg.read().current("tenant-0") == 2
    # A delete during a registration: the in-flight version is abandoned, its commit is a 409.
    v3, _ = reg.reserve("tenant-0", src)
    info3 = reg.stage("tenant-0", v3, src)
    reg.delete("tenant-0", in_store=True)
    with pytest.raises(RegistryConflictError):
        reg.commit("tenant-0", v3, info3)
    assert reg.read().is_deleted("tenant-0")


# ---- 2. caches are checked against the manifest's content fingerprint ------------------------------


def test_disk_cache_hit_is_checked_against_the_manifest_fingerprint(s3, tmp_path, tiny_assets):
    uri, src = _s3_prefix(s3, tiny_assets)
    cfg = StoreConfig(storage_options=s3.storage_options, disk_cache_dir=str(tmp_path / "cache"))
    store = open_store(uri, cfg)
    reg = AdapterRegistry(store, cfg)
    reg.commit("t", 1, reg.stage("t", 1, f"{src}/2"))
    fetcher = AdapterFetcher(store, cfg)
    first = fetcher.fetch("t", 1)
    assert _digest(Path(first.path)) == _digest(tiny_assets.adapter_path("tenant-2"))

    # What a reused number did: v1's folder rewritten with other content, and the manifest
    # recording that content. The cached copy (the first content) must not answer.
    info = reg.stage("t", 1, f"{src}/3")
    raw = json.loads(store.read_bytes(".registry/manifest.json"))
    raw["adapters"]["t"]["versions"]["1"]["fingerprint"] = info["fingerprint"]
    raw["generation"] += 1
    store.write_bytes(".registry/manifest.json", json.dumps(raw).encode())
    again = AdapterFetcher(store, cfg).fetch("t", 1)  # another replica on the node: same disk cache
    assert _digest(Path(again.path)) == _digest(tiny_assets.adapter_path("tenant-3")), (
        "the disk cache answered tenant-0@v1 with content the manifest does not name")

    # A stored copy that is not what the manifest recorded is refused (422), never served.
    raw["adapters"]["t"]["versions"]["1"]["fingerprint"] = "sha256:" + "0" * 64
    raw["generation"] += 1
    store.write_bytes(".registry/manifest.json", json.dumps(raw).encode())
    fresh = AdapterFetcher(store, cfg)
    with pytest.raises(InvalidAdapterError, match=r"adapter 't' version 1: .*do not match .*register it again") as e:
        fresh.fetch("t", 1)
    assert "s3://" not in e.value.message and BUCKET not in e.value.message
    assert fresh.disk.get(fresh._key(reg.version_rel("t", 1))) is None  # the stale cached copy is gone


def test_ram_tier_is_checked_against_the_manifest_fingerprint(tmp_path, tiny_assets):
    """The LoRA replica's RAM tier: a parsed copy whose fingerprint is not the manifest's is re-parsed."""
    from serve_app.deployments.lora import LoRADeployment

    root = _local_store(tmp_path, tiny_assets)
    dep = LoRADeployment({"base_model": str(tiny_assets.base), "adapters": str(root), "max_lora_rank": 32,
                          "torch_threads": 1})
    try:
        reg = dep.registry
        # The state an interrupted registration left behind (before the fix): v1 staged with
        # tenant-2's files (rank 16) and validated, so the replica holds it in RAM.
        reg.stage("t", 1, str(tiny_assets.adapter_path("tenant-2")))
        first = asyncio.run(dep.validate_adapter("t", 1))
        assert first["rank"] == 16
        # Then v1 is staged again with tenant-3's files (rank 32) and committed.
        reg.commit("t", 1, reg.stage("t", 1, str(tiny_assets.adapter_path("tenant-3"))))

        async def load():
            weights, tier, _ = await dep._weights("t@v1")
            return weights.rank, tier

        rank, tier = asyncio.run(load())
        assert rank == 32, "the RAM tier answered t@v1 with the first attempt's weights"
        weights, fp = dep.ram.get("t@v1")  # the RAM tier now holds the registered content
        assert weights.rank == 32 and fp == reg.read().fingerprint("t", 1) == _digest(tiny_assets.adapter_path("tenant-3"))
    finally:
        dep.engine.shutdown()


# ---- 3. concurrent writes on S3 ----------------------------------------------------------------


def test_concurrent_admin_writes_on_s3_lose_nothing(s3, tmp_path, tiny_assets):
    """Two routers write the manifest at the same instant (manifest PUTs slowed to 0.4 s, so both
    read the same manifest before either write lands): every 200 is visible, the rest are 409s,
    and a tombstone is never lost."""
    uri, src = _s3_prefix(s3, tiny_assets, srcs=(2, 3, 4))
    cfg = StoreConfig(storage_options=s3.storage_options, disk_cache_dir=str(tmp_path / "cache"))
    arrived: list[str] = []
    go = asyncio.Event()

    async def barrier(adapter_id, version):  # both validations finish together: commits race
        arrived.append(adapter_id)
        if len(arrived) >= 2:
            go.set()
        await asyncio.wait_for(go.wait(), 30)

    routers = [_admin(uri, cfg, FakeLora(barrier)), _admin(uri, cfg, FakeLora(barrier))]
    try:
        s3.manifest_put_delay_s = 0.4

        async def run_registers():
            return await asyncio.gather(
                routers[0].register_adapter("tenant-a", f"{src}/2", warm=False),
                routers[1].register_adapter("tenant-b", f"{src}/3", warm=False),
                return_exceptions=True)

        results = asyncio.run(run_registers())
        m = routers[0].registry.read()
        for aid, res in zip(("tenant-a", "tenant-b"), results):
            if isinstance(res, BaseException):
                assert isinstance(res, RegistryConflictError) and res.status_code == 409, repr(res)
            else:
                assert m.current(aid) == res["version"] >= 1, f"{aid} got a 200 but its version is not current: {m.adapters}"
        assert sum(not isinstance(r, BaseException) for r in results) >= 1

        # A tombstone racing a registration on the other router.
        go.clear()
        arrived.clear()
        arrived.append("padding")  # one validation reaching the barrier releases it

        async def run_delete_and_register():
            async def delete():
                await asyncio.sleep(0.1)
                try:
                    return await routers[0].delete_adapter("tenant-1")
                finally:
                    go.set()

            async def register():
                # Commit reads the manifest while the delete's PUT is in flight.
                routers[1].lora.hook = lambda a, v: asyncio.sleep(0.25)
                return await routers[1].register_adapter("tenant-c", f"{src}/4", warm=False)

            return await asyncio.gather(delete(), register(), return_exceptions=True)

        deleted, registered = asyncio.run(run_delete_and_register())
        m = routers[1].registry.read()
        if isinstance(deleted, BaseException):
            assert isinstance(deleted, RegistryConflictError), repr(deleted)
        else:
            assert m.is_deleted("tenant-1"), f"the tombstone of tenant-1 was lost: {m.adapters.get('tenant-1')}"
        if isinstance(registered, BaseException):
            assert isinstance(registered, RegistryConflictError), repr(registered)
        else:
            assert m.current("tenant-c") == registered["version"], f"tenant-c's registration was lost: {m.adapters}"
        # The writes from before are still there.
        for aid, res in zip(("tenant-a", "tenant-b"), results):
            if not isinstance(res, BaseException):
                assert m.current(aid) == res["version"]
    finally:
        s3.manifest_put_delay_s = 0.0
        for r in routers:
            r.close()


def test_s3_conditional_write_is_a_conflict_not_a_silent_success(s3, tiny_assets):
    uri, _ = _s3_prefix(s3, tiny_assets, srcs=())
    cfg = StoreConfig(storage_options=s3.storage_options)
    store = open_store(uri, cfg)
    data, tag = store.read_versioned("x/m.json")
    assert data is None and tag is None
    tag1 = store.write_if("x/m.json", b"one", None)
    with pytest.raises(ServeAppError) as e:  # it exists now: a create loses
        store.write_if("x/m.json", b"two", None)
    assert e.value.status_code == 409
    assert store.read_versioned("x/m.json") == (b"one", tag1)
    tag2 = store.write_if("x/m.json", b"two", tag1)
    with pytest.raises(ServeAppError) as e:  # a writer that read "one" loses
        store.write_if("x/m.json", b"three", tag1)
    assert e.value.status_code == 409 and store.read_bytes("x/m.json") == b"two"
    assert store.read_versioned("x/m.json") == (b"two", tag2)


def test_local_conditional_write(tmp_path, tiny_assets):
    store = open_store(str(_local_store(tmp_path, tiny_assets)))
    tag1 = store.write_if(".registry/manifest.json", b"one", None)
    with pytest.raises(ServeAppError) as e:
        store.write_if(".registry/manifest.json", b"two", None)
    assert e.value.status_code == 409
    store.write_if(".registry/manifest.json", b"two", tag1)
    with pytest.raises(ServeAppError):
        store.write_if(".registry/manifest.json", b"three", tag1)
    assert store.read_bytes(".registry/manifest.json") == b"two"


# ---- 4. reserved IDs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["manifest.json", "MANIFEST.JSON", "Manifest.json"])
def test_registry_file_names_are_reserved_ids(name, tmp_path, tiny_assets):
    with pytest.raises(InvalidRequestError, match=r"reserved") as e:
        validate_adapter_id(name)
    assert e.value.status_code == 400 and e.value.code == "invalid_model"
    assert name in e.value.message
    root = _local_store(tmp_path, tiny_assets)
    admin = _admin(str(root), StoreConfig(), FakeLora())
    try:
        with pytest.raises(InvalidRequestError, match="reserved") as e:
            asyncio.run(admin.register_adapter(name, str(tiny_assets.adapter_path("tenant-2")), warm=False))
        assert e.value.code == "invalid_model"
        with pytest.raises(InvalidRequestError, match="reserved"):
            admin.resolve(name)
        with pytest.raises(InvalidRequestError, match="reserved"):
            asyncio.run(admin.delete_adapter(name))
        # The registry still reads (before the fix: a folder named manifest.json broke every read).
        asyncio.run(admin.register_adapter("tenant-0", str(tiny_assets.adapter_path("tenant-2")), warm=False))
        assert admin.registry.read().current("tenant-0") == 1
    finally:
        admin.close()


def test_registry_dir_must_be_hidden():
    """A registry folder that a valid adapter ID could name would collide with that adapter."""
    with pytest.raises(ValueError, match=r"registry_dir 'registry' .*start with '\.'"):
        StoreConfig(registry_dir="registry")
    assert StoreConfig(registry_dir=".versions").registry_dir == ".versions"


# ---- 5. tenant-facing errors carry no store URIs or paths ------------------------------------------


def _clean(msg: str, *secrets: str) -> None:
    assert "://" not in msg, msg
    for s in secrets:
        assert s not in msg, (s, msg)


def test_errors_name_the_adapter_not_the_store(s3, tmp_path, tiny_assets):
    uri, _ = _s3_prefix(s3, tiny_assets, srcs=())
    prefix = uri.rsplit("/", 1)[-1]
    cfg = StoreConfig(storage_options=s3.storage_options, disk_cache_dir=str(tmp_path / "cache"))
    fetcher = AdapterFetcher(open_store(uri, cfg), cfg)
    with pytest.raises(AdapterNotFoundError) as e:
        fetcher.fetch("ghost", 0)
    assert "'ghost'" in e.value.message
    _clean(e.value.message, BUCKET, prefix)
    with pytest.raises(AdapterNotFoundError) as e:
        fetcher.fetch("ghost", 3)
    assert "'ghost'" in e.value.message and "3" in e.value.message
    _clean(e.value.message, BUCKET, prefix, ".registry")

    # Store unreachable: a 503 that says so, without the endpoint or the bucket.
    down = StoreConfig(storage_options={
        "key": "testing", "secret": "testing",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}},
    }, disk_cache_dir=str(tmp_path / "cache2"))
    with pytest.raises(AdapterStoreUnavailableError, match="unreachable") as e:
        AdapterFetcher(open_store(f"s3://{BUCKET}/secret-prefix", down), down).fetch("tenant-0", 0)
    _clean(e.value.message, "127.0.0.1", "secret-prefix", BUCKET)

    # Local store: no folder paths either.
    root = _local_store(tmp_path, tiny_assets)
    local = AdapterFetcher(open_store(str(root)))
    with pytest.raises(AdapterNotFoundError) as e:
        local.fetch("ghost", 0)
    _clean(e.value.message, str(tmp_path))
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidAdapterError, match="'broken'.*adapter_model.safetensors is missing") as e:
        local.fetch("broken", 0)
    _clean(e.value.message, str(tmp_path))
    gone = AdapterFetcher(open_store(str(tmp_path / "unmounted")))
    with pytest.raises(AdapterStoreUnavailableError) as e:
        gone.fetch("tenant-0", 0)
    _clean(e.value.message, str(tmp_path))

    # The router, before the store ever answered.
    admin = _admin(str(tmp_path / "unmounted"), StoreConfig(), FakeLora())
    try:
        with pytest.raises(AdapterStoreUnavailableError) as e:
            admin.resolve("tenant-0")
        _clean(e.value.message, str(tmp_path))
    finally:
        admin.close()


def test_corrupt_manifest_message_names_no_path(tmp_path, tiny_assets):
    root = _local_store(tmp_path, tiny_assets)
    (root / ".registry").mkdir()
    (root / ".registry" / "manifest.json").write_text("{not json")
    with pytest.raises(ServeAppError, match="manifest is corrupt") as e:
        AdapterRegistry(open_store(str(root))).read()
    _clean(e.value.message, str(tmp_path))


def test_manifest_keeps_reading_old_formats():
    """Manifests written before this change (listing fingerprints, no states) still read."""
    m = Manifest.from_json(json.dumps({"generation": 4, "adapters": {"a": {
        "current": 2, "next": 3, "versions": {"1": {"files": False}, "2": {"files": True,
                                                                            "fingerprint": "adapter_config.json:1:x"}}}}})
                           .encode())
    assert m.current("a") == 2 and m.fingerprint("a", 2) is None and not m.is_stale("a@v2") and m.is_stale("a@v1")


# ---- 6. non-float tensors through the admin API ------------------------------------------------------


def _retyped_adapter(good: Path, out: Path, dtype) -> Path:
    """``good`` with its first tensor stored as ``dtype`` (fp8, int8 ...)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(good, out)
    tensors = load_file(out / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


@pytest.fixture(scope="module")
def base_shape(tiny_assets):
    import torch
    from transformers import AutoModelForCausalLM

    from serve_app.config import LORA_TARGET_KINDS
    from serve_app.engine.arch import base_shape

    model = AutoModelForCausalLM.from_pretrained(str(tiny_assets.base), dtype=torch.float32)
    return base_shape(model, LORA_TARGET_KINDS)


class ParsingLora(FakeLora):
    """Validates as a LoRA replica does: fetch the staged version, parse it (engine/lora/weights.py)."""

    def __init__(self, store, cfg, base_shape):
        super().__init__()
        self.fetcher = AdapterFetcher(store, cfg)
        self.base_shape = base_shape

    async def _validate(self, adapter_id, version, fingerprint=None):
        import torch

        from serve_app.engine.lora.weights import load_lora_weights

        fetched = self.fetcher.fetch(adapter_id, version, fingerprint)
        w = load_lora_weights(f"{adapter_id}@v{version}", fetched.path, self.base_shape, max_rank=32,
                              dtype=torch.float32)
        return {"rank": w.rank, "nbytes": w.nbytes, "raw_bytes": w.raw_bytes, "warnings": list(w.warnings),
                "tier": fetched.tier, "seconds": 0.0}


@pytest.mark.parametrize("dtype_name", ["float8_e4m3fn", "float8_e5m2", "int8"])
def test_non_float_weights_registered_through_admin_are_a_422(dtype_name, tmp_path, tiny_assets, base_shape):
    import torch

    root = _local_store(tmp_path, tiny_assets)
    store = open_store(str(root))
    admin = _admin(str(root), StoreConfig(), ParsingLora(store, StoreConfig(), base_shape))
    src = _retyped_adapter(tiny_assets.adapter_path("tenant-2"), tmp_path / "bad", getattr(torch, dtype_name))
    try:
        with pytest.raises(InvalidAdapterError) as e:
            asyncio.run(admin.register_adapter("tenant-0", str(src), warm=False))
        assert e.value.status_code == 422 and e.value.code == "invalid_adapter"
        assert re.search(rf"'tenant-0@v1': tensor \S+ has dtype {dtype_name}; LoRA weights must be float", e.value.message), \
            e.value.message
        m = admin.registry.read()
        assert m.current("tenant-0") == 0 and m.version_info("tenant-0", 1)["state"] == "refused"
        assert store.list_files(admin.registry.version_rel("tenant-0", 1)) == {}
        # A good registration afterwards gets the next number.
        out = asyncio.run(admin.register_adapter("tenant-0", str(tiny_assets.adapter_path("tenant-2")), warm=False))
        assert out["version"] == 2 and admin.registry.read().current("tenant-0") == 2
    finally:
        admin.close()


# ---- 7. one manifest watcher (issue 26) ------------------------------------------------------------
# Routers (their resolve snapshot) and both engine deployments (retiring old and deleted versions)
# poll the manifest through adapters/registry.py's ManifestWatcher; these pin down what a poll
# does when the store fails, when the callback fails, and when this process writes meanwhile.


class _ScriptedRegistry:
    """``read`` answers from a script: a Manifest, an exception to raise, or a callable run first."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.threads: list[str] = []

    def read(self):
        import threading

        self.threads.append(threading.current_thread().name)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if callable(answer):
            answer = answer()
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_manifest_watcher_poll_reports_failures_and_drops_reads_a_write_overtook():
    from serve_app.adapters.registry import ManifestWatcher

    m1, m2, m3 = Manifest(generation=1), Manifest(generation=2), Manifest(generation=3)
    writes = [0]

    def written_meanwhile():  # this process wrote the manifest while the read was in flight
        writes[0] += 1
        return m2

    reg = _ScriptedRegistry(m1, ServeAppError("store down"), written_meanwhile, m3, m3)
    got, errors, after = [], [], []

    def take(m):
        got.append(m.generation)
        if m.generation == 3 and len(got) == 2:
            raise RuntimeError("a bug in the callback")

    w = ManifestWatcher(reg, 1.0, take, on_error=errors.append, writes=lambda: writes[0],
                        also=lambda: after.append(1))
    assert w.poll() is m1
    assert w.poll() is None and [e.message for e in errors] == ["store down"]
    assert w.poll() is None, "a read that began before this process's own write must be dropped"
    assert w.poll() is m3  # the callback raised: logged, the poll does not
    assert w.poll() is m3  # and the next poll hands the manifest over again
    assert got == [1, 3, 3] and len(after) == 5  # ``also`` runs after every poll


def test_manifest_watcher_runs_on_a_thread_or_on_the_event_loop():
    import threading

    from serve_app.adapters.registry import ManifestWatcher

    # A thread (the router): polls every period until stopped.
    reg = _ScriptedRegistry(Manifest(generation=1))
    seen = threading.Event()
    count = [0]

    def take(_m):
        count[0] += 1
        if count[0] >= 3:
            seen.set()

    w = ManifestWatcher(reg, 0.01, take)
    w.start_thread("test-watcher")
    assert seen.wait(10)
    w.stop()
    w._thread.join(5)
    assert not w._thread.is_alive() and set(reg.threads) == {"test-watcher"}

    # A task (an engine replica): reads at once, then every period, off the loop's thread;
    # a coroutine callback is awaited; a store that fails is retried at the next period.
    reg = _ScriptedRegistry(Manifest(generation=1), ServeAppError("down"), Manifest(generation=2))
    applied: list[int] = []

    async def apply(m):
        await asyncio.sleep(0)
        applied.append(m.generation)

    async def main():
        task = asyncio.get_running_loop().create_task(ManifestWatcher(reg, 0.01, apply, on_error=lambda e: None).run())
        for _ in range(500):
            if len(applied) >= 2:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        return threading.current_thread().name

    loop_thread = asyncio.run(main())
    assert applied[:2] == [1, 2] and loop_thread not in reg.threads


def test_lora_replica_retires_old_and_deleted_versions(tmp_path, tiny_assets):
    """The LoRA side of deployments/versioned.py: a manifest retires stale versions on the device
    (out of Serve's LRU, announced, its rows freed after its requests) and in the RAM tier;
    loading a version finds the older ones it replaces."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from serve_app.deployments.lora import LoRADeployment

    root = _local_store(tmp_path, tiny_assets)
    dep = LoRADeployment({"base_model": str(tiny_assets.base), "adapters": str(root), "max_lora_rank": 32,
                          "torch_threads": 1})
    try:
        reg = dep.registry
        reg.commit("t", 1, reg.stage("t", 1, str(tiny_assets.adapter_path("tenant-2"))))
        asyncio.run(dep.validate_adapter("t", 1))  # t@v1 parsed into the RAM tier
        reg.commit("t", 2, reg.stage("t", 2, str(tiny_assets.adapter_path("tenant-3"))))
        reg.delete("tenant-1", in_store=True)
        retired: list[str] = []
        loaded = {m: SimpleNamespace(retire=lambda m=m: retired.append(m)) for m in ("t@v2", "tenant-1", "tenant-0")}
        wrapper = SimpleNamespace(models=OrderedDict(loaded), _push_multiplexed_replica_info=False)
        setattr(dep._load_fn, "__serve_multiplex_wrapper", wrapper)  # Serve's LRU, stood in for
        assert dep._older_versions("t@v2") == ["t@v1"] and dep._older_versions("t@v3") == ["t@v2", "t@v1"]

        assert sorted(asyncio.run(dep.refresh_registry())) == ["t@v1", "tenant-1"]
        assert retired == ["tenant-1"] and dep.retired_versions == 1 and wrapper._push_multiplexed_replica_info
        assert list(dep._models()) == ["t@v2", "tenant-0"] and "t@v1" not in dep.loader.cached()
        assert asyncio.run(dep.refresh_registry()) == []  # nothing stale is left
    finally:
        dep.engine.shutdown()
