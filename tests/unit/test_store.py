"""Adapter store backends, disk cache LRU, RAM tier, version registry, fetcher, validation messages.

S3 tests run against moto's server on 127.0.0.1 (tests/moto_s3.py), in this process.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from serve_app.adapters.config import StoreConfig
from serve_app.adapters.disk_cache import DiskCache
from serve_app.adapters.fetch import AdapterFetcher
from serve_app.adapters.ids import validate_adapter_id
from serve_app.adapters.ram_cache import RamCache
from serve_app.adapters.registry import (
    AdapterRegistry,
    Manifest,
    RegistryConflictError,
    mux_id,
    parse_mux_id,
)
from serve_app.adapters.backends import open_store
from serve_app.config import LORA_TARGET_KINDS, AppConfig
from serve_app.engine.lora.weights import load_lora_weights
from serve_app.errors import (
    AdapterNotFoundError,
    AdapterStoreUnavailableError,
    InvalidAdapterError,
    InvalidRequestError,
)
from tests.bad_adapters import BAD_CASES, MAX_ADAPTER_BYTES, MAX_RANK, make_bad_adapters
from tests.moto_s3 import S3Server

BUCKET = "adapters"


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def base_shape(tiny_assets):
    from transformers import AutoModelForCausalLM

    from serve_app.engine.arch import base_shape

    model = AutoModelForCausalLM.from_pretrained(str(tiny_assets.base), dtype=torch.float32)
    return base_shape(model, LORA_TARGET_KINDS)


def _local_store(tmp_path, tiny_assets, ids=("tenant-0", "tenant-1")) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    for i in ids:
        shutil.copytree(tiny_assets.adapter_path(i), root / i)
    return root


def _s3_config(s3, **kw) -> StoreConfig:
    return StoreConfig(storage_options=s3.storage_options, **kw)


# ---- IDs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,msg", [
    ("", "non-empty"), ("a/b", "invalid"), ("..", "invalid"), ("x..y", "invalid"), (" t", "invalid"),
    ("t\n", "invalid"), ("x" * 129, "129 characters, more than the limit 128"),
])
def test_adapter_id_rules(bad, msg):
    with pytest.raises(InvalidRequestError, match=msg):
        validate_adapter_id(bad)
    assert validate_adapter_id("x" * 128)
    assert validate_adapter_id("tenant:task-1.v2")


def test_mux_ids_round_trip():
    assert mux_id("t", 0) == "t" and parse_mux_id("t") == ("t", 0)
    assert mux_id("t", 12) == "t@v12" and parse_mux_id("t@v12") == ("t", 12)
    assert parse_mux_id("a@b") == ("a@b", 0)


# ---- backends ------------------------------------------------------------------------------------


def _exercise_backend(store, tiny_assets):
    assert store.list_ids() == ["tenant-0", "tenant-1"]
    assert store.exists("tenant-0") and not store.exists("nope")
    files = store.list_files("tenant-0")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)  # PEFT also writes a README
    assert files["adapter_model.safetensors"].size == (tiny_assets.adapter_path("tenant-0") /
                                                       "adapter_model.safetensors").stat().st_size
    assert store.list_files("nope") == {}
    assert store.read_bytes("nope/x.json") is None
    store.write_bytes(".registry/manifest.json", b'{"a": 1}')
    assert store.read_bytes(".registry/manifest.json") == b'{"a": 1}'
    assert store.list_ids() == ["tenant-0", "tenant-1"]  # hidden folders are not adapters
    store.delete_tree(".registry")
    assert store.read_bytes(".registry/manifest.json") is None
    with pytest.raises(ValueError):
        store.list_files("../etc")


def test_local_backend(tmp_path, tiny_assets):
    root = _local_store(tmp_path, tiny_assets)
    store = open_store(str(root))
    assert store.is_local and store.tier == "disk"
    _exercise_backend(store, tiny_assets)
    assert store.local_path("tenant-1") == str(root / "tenant-1")
    # The root going away (an unmounted volume) is "unavailable", not "not found".
    gone = open_store(str(tmp_path / "missing"))
    with pytest.raises(AdapterStoreUnavailableError, match="folder is missing or not mounted") as e:
        gone.exists("tenant-0")
    assert str(tmp_path) not in e.value.message  # tenants see no paths
    with pytest.raises(AdapterStoreUnavailableError):
        gone.list_ids()


def test_s3_backend(s3, tmp_path, tiny_assets):
    for i in ("tenant-0", "tenant-1"):
        s3.upload_dir(tiny_assets.adapter_path(i), BUCKET, f"backend/{i}")
    store = open_store(f"s3://{BUCKET}/backend", _s3_config(s3))
    assert not store.is_local and store.tier == "s3"
    _exercise_backend(store, tiny_assets)
    store.get_file("tenant-1/adapter_config.json", str(tmp_path / "c.json"))
    assert json.loads((tmp_path / "c.json").read_text())["r"] == 8


def test_s3_unreachable_is_503_fast():
    cfg = StoreConfig(storage_options={
        "key": "testing", "secret": "testing",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}},
    })
    store = open_store(f"s3://{BUCKET}/x", cfg)
    t0 = time.monotonic()
    for call in (store.list_ids, lambda: store.list_files("t"), lambda: store.read_bytes("m.json")):
        with pytest.raises(AdapterStoreUnavailableError, match=r"the adapter store is unreachable") as e:
            call()
        assert "s3://" not in e.value.message and "127.0.0.1" not in e.value.message  # tenants see no URIs
    assert time.monotonic() - t0 < 30


# ---- disk cache ----------------------------------------------------------------------------------


def _filler(nbytes: int, tag: bytes = b"x"):
    def fill(folder: Path):
        (folder / "adapter_model.safetensors").write_bytes(tag * nbytes)
        (folder / "adapter_config.json").write_text("{}")
    return fill


def test_disk_cache_lru_cap(tmp_path):
    evicted = []
    cache = DiskCache(tmp_path / "c", max_bytes=2500, on_evict=evicted.append)
    for k in ("a", "b"):
        cache.put(k, _filler(1000), fingerprint=k)
        time.sleep(0.02)  # distinct mtimes
    assert cache.get("a").fingerprint == "a"  # touch a: b is now the least recently used
    time.sleep(0.02)
    cache.put("c", _filler(1000))
    assert evicted == ["b"]
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    assert cache.total_bytes() <= 2500
    # A replacement of the same key swaps the folder whole.
    entry = cache.put("a", _filler(500, b"y"), fingerprint="a2")
    assert Path(entry.path, "adapter_model.safetensors").read_bytes() == b"y" * 500
    assert cache.get("a").fingerprint == "a2"
    # One entry larger than the cap is kept alone.
    cache.put("big", _filler(5000))
    assert cache.keys() == ["big"] and cache.get("big").nbytes >= 5000
    # A second cache object on the same folder (another replica on the node) sees the same entries.
    assert DiskCache(tmp_path / "c", max_bytes=2500).get("big") is not None
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith((".tmp", ".trash"))]


def test_disk_cache_failed_fill_leaves_nothing(tmp_path):
    cache = DiskCache(tmp_path / "c", max_bytes=10_000)

    def boom(folder):
        (folder / "partial").write_bytes(b"x" * 10)
        raise OSError("connection reset")

    with pytest.raises(OSError):
        cache.put("k", boom)
    assert cache.get("k") is None and cache.keys() == []
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".tmp")]


# ---- RAM tier ------------------------------------------------------------------------------------


def test_ram_cache_lru_and_cap():
    evicted = []
    ram = RamCache(100, on_evict=evicted.append)
    assert ram.put("a", "A", 40) and ram.put("b", "B", 40)
    assert ram.get("a") == "A"
    assert ram.put("c", "C", 40)  # over the cap: b (least recently used) goes
    assert evicted == ["b"] and ram.keys() == ["a", "c"] and ram.nbytes == 80
    assert not ram.put("huge", "H", 101) and "huge" not in ram
    assert ram.pop("a") == "A" and ram.nbytes == 40
    assert ram.get("zzz") is None
    s = ram.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["entries"]) == (1, 1, 1, 1)


# ---- registry ------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def registry_store(request, tmp_path, tiny_assets):
    if request.param == "local":
        return open_store(str(_local_store(tmp_path, tiny_assets))), StoreConfig(), str(tmp_path / "src")
    s3 = request.getfixturevalue("s3")
    prefix = f"reg-{time.monotonic_ns()}"
    for i in ("tenant-0", "tenant-1"):
        s3.upload_dir(tiny_assets.adapter_path(i), BUCKET, f"{prefix}/{i}")
    cfg = _s3_config(s3)
    return open_store(f"s3://{BUCKET}/{prefix}", cfg), cfg, f"s3://{BUCKET}/{prefix}-src"


def test_registry_versions_history_and_delete(registry_store, tiny_assets, s3):
    store, cfg, src_root = registry_store
    # Sources: tenant-2's and tenant-3's files, uploaded where register will read them.
    srcs = []
    for i in (2, 3, 4):
        if src_root.startswith("s3://"):
            s3.upload_dir(tiny_assets.adapter_path(f"tenant-{i}"), BUCKET, f"{src_root[len('s3://' + BUCKET) + 1:]}/{i}")
        else:
            shutil.copytree(tiny_assets.adapter_path(f"tenant-{i}"), Path(src_root) / str(i))
        srcs.append(f"{src_root}/{i}")
    reg = AdapterRegistry(store, cfg)
    m = reg.read()
    assert m.generation == 0 and m.current("tenant-0") == 0 and m.next_version("tenant-0") == 1

    for n, src in enumerate(srcs, start=1):
        v = reg.read().next_version("tenant-0")
        assert v == n
        info = reg.stage("tenant-0", v, src)
        assert info["bytes"] > 0 and info["source"] == src
        m = reg.commit("tenant-0", v, info)
        assert m.current("tenant-0") == n
    # The version folders hold exactly the registered files; only keep_versions (2) remain.
    v3 = store.list_files(reg.version_rel("tenant-0", 3))
    assert set(v3) == {"adapter_config.json", "adapter_model.safetensors"}
    assert v3["adapter_model.safetensors"].size == (tiny_assets.adapter_path("tenant-4") /
                                                    "adapter_model.safetensors").stat().st_size
    assert store.list_files(reg.version_rel("tenant-0", 2))
    assert store.list_files(reg.version_rel("tenant-0", 1)) == {}
    m = reg.read()
    versions = m.entry("tenant-0")["versions"]
    assert [versions[str(v)]["files"] for v in (1, 2, 3)] == [False, True, True]
    assert m.registered_ids() == ["tenant-0"]

    # Staleness as a replica sees it: old versions and v0 are stale, the current one and
    # versions newer than this manifest are not.
    assert m.is_stale("tenant-0") and m.is_stale("tenant-0@v1") and m.is_stale("tenant-0@v2")
    assert not m.is_stale("tenant-0@v3") and not m.is_stale("tenant-0@v4")
    assert not m.is_stale("tenant-1") and not m.is_stale("tenant-1@v1")

    # A refused version burns its number; the current version stays.
    reg.record_failure("tenant-0", 4, {"source": "x"}, "adapter 'tenant-0@v4': bad")
    m = reg.read()
    assert m.current("tenant-0") == 3 and m.next_version("tenant-0") == 5
    with pytest.raises(RegistryConflictError):
        reg.commit("tenant-0", 4, {"source": "late"})

    # Delete: tombstone, files gone; v0 folders too are hidden by a tombstone.
    m, prev = reg.delete("tenant-0", in_store=True)
    assert prev == 3 and m.current("tenant-0") is None and m.is_deleted("tenant-0")
    assert m.is_stale("tenant-0@v3") and m.is_stale("tenant-0")
    assert store.list_files(reg.version_rel("tenant-0", 3)) == {}
    with pytest.raises(AdapterNotFoundError, match="already deleted"):
        reg.delete("tenant-0", in_store=True)
    m, prev = reg.delete("tenant-1", in_store=True)
    assert prev == 0 and m.current("tenant-1") is None
    with pytest.raises(AdapterNotFoundError):
        reg.delete("ghost", in_store=False)
    # Re-registering after a delete continues the numbering: id@v<n> always names one content.
    v = reg.read().next_version("tenant-0")
    assert v == 5
    m = reg.commit("tenant-0", v, reg.stage("tenant-0", v, srcs[0]))
    assert m.current("tenant-0") == 5 and not m.is_deleted("tenant-0")


def test_registry_stage_refuses_before_copying(tmp_path, tiny_assets):
    store = open_store(str(_local_store(tmp_path, tiny_assets)))
    reg = AdapterRegistry(store, StoreConfig(max_adapter_bytes=MAX_ADAPTER_BYTES))
    bad = make_bad_adapters(tiny_assets.adapter_path("tenant-0"), tmp_path / "bad")
    for name, pattern in [("bad-pickle", "pickle file and is refused"),
                          ("bad-no-config", "adapter_config.json is missing"),
                          ("bad-json", "not valid JSON"),
                          ("bad-size", "more than max_adapter_bytes 1048576")]:
        with pytest.raises(InvalidAdapterError, match=pattern):
            reg.stage("t", 1, str(bad[name]))
    with pytest.raises(InvalidAdapterError, match=r"nothing at .*/nowhere; the URI must be a folder"):
        reg.stage("t", 1, str(tmp_path / "nowhere"))
    with pytest.raises(InvalidRequestError, match="reserved for versions"):
        reg.stage("t@v3", 1, str(bad["bad-json"]))
    with pytest.raises(InvalidRequestError, match="'..' path segments"):
        reg.stage("t", 1, str(tmp_path / "bad" / ".." / "bad" / "bad-json"))
    fenced = AdapterRegistry(store, StoreConfig(allowed_source_prefixes=["s3://uploads/"]))
    with pytest.raises(InvalidRequestError, match=r"outside store.allowed_source_prefixes \['s3://uploads/'\]"):
        fenced.stage("t", 1, str(tiny_assets.adapter_path("tenant-1")))
    assert store.list_files(reg.version_rel("t", 1)) == {}  # nothing was copied for refused ones


def test_manifest_tolerates_missing_and_reads_old():
    assert Manifest.from_json(None).adapters == {}
    m = Manifest.from_json(b'{"generation": 3, "adapters": {"a": {"current": 2, "next": 3, "versions": {}}}}')
    assert m.generation == 3 and m.current("a") == 2 and m.current("b") == 0


# ---- fetcher (tiers below the replica) -------------------------------------------------------------


def test_fetch_local_reads_in_place(tmp_path, tiny_assets):
    root = _local_store(tmp_path, tiny_assets)
    fetcher = AdapterFetcher(open_store(str(root)))
    got = fetcher.fetch("tenant-0", 0)
    assert got.path == str(root / "tenant-0") and got.tier == "disk" and fetcher.disk is None
    with pytest.raises(AdapterNotFoundError, match="'ghost' not found"):
        fetcher.fetch("ghost", 0)


def test_fetch_s3_disk_cache_and_store_down(tmp_path, tiny_assets, caplog):
    s3 = S3Server().start()  # its own server: this test stops it
    try:
        s3.create_bucket("down")
        for i in ("tenant-0", "tenant-1", "tenant-2"):
            s3.upload_dir(tiny_assets.adapter_path(i), "down", f"root/{i}")
        cfg = _s3_config(s3, disk_cache_dir=str(tmp_path / "cache"), progress_min_bytes=0)
        store = open_store("s3://down/root", cfg)
        reg = AdapterRegistry(store, cfg)
        reg.commit("tenant-1", 1, reg.stage("tenant-1", 1, "s3://down/root/tenant-2"))
        events = []
        fetcher = AdapterFetcher(store, cfg, on_event=lambda e, t: events.append((e, t)))

        with caplog.at_level(logging.INFO, logger="serve_app.adapters.fetch"):
            first = fetcher.fetch("tenant-0", 0)
        assert first.tier == "s3" and fetcher.downloads == 1
        assert re.search(r"downloading s3://down/root/tenant-0/adapter_model.safetensors: 100% "
                         r"\(\d+\.\d / \d+\.\d MB, [\d.]+ MB/s\)", caplog.text), caplog.text
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (Path(first.path) / name).read_bytes() == (tiny_assets.adapter_path("tenant-0") / name).read_bytes()
        again = fetcher.fetch("tenant-0", 0)
        assert again.tier == "disk" and again.path == first.path and fetcher.downloads == 1
        v1 = fetcher.fetch("tenant-1", 1)
        assert v1.tier == "s3" and (Path(v1.path) / "adapter_model.safetensors").read_bytes() == (
            tiny_assets.adapter_path("tenant-2") / "adapter_model.safetensors").read_bytes()
        assert ("miss", "disk") in events and ("hit", "disk") in events

        # v0 replaced in place: the next fetch sees the new ETag and downloads again.
        s3.upload_dir(tiny_assets.adapter_path("tenant-1"), "down", "root/tenant-0")
        changed = fetcher.fetch("tenant-0", 0)
        assert changed.tier == "s3" and fetcher.downloads == 3
        assert (Path(changed.path) / "adapter_model.safetensors").read_bytes() == (
            tiny_assets.adapter_path("tenant-1") / "adapter_model.safetensors").read_bytes()

        s3.stop()
        # Cached adapters keep serving from disk while the store is down; uncached ones are 503.
        assert fetcher.fetch("tenant-1", 1).tier == "disk"
        assert fetcher.fetch("tenant-0", 0).tier == "disk"
        with pytest.raises(AdapterStoreUnavailableError, match="unreachable"):
            fetcher.fetch("tenant-2", 0)
        s3.start()
        assert fetcher.fetch("tenant-2", 0).tier == "s3"  # recovered
    finally:
        s3.stop()


def test_fetch_refuses_before_download(s3, tmp_path, tiny_assets):
    bad = make_bad_adapters(tiny_assets.adapter_path("tenant-0"), tmp_path / "bad")
    for name in ("bad-pickle", "bad-no-config", "bad-size", "bad-no-weights"):
        s3.upload_dir(bad[name], BUCKET, f"refuse/{name}")
    cfg = _s3_config(s3, disk_cache_dir=str(tmp_path / "cache"), max_adapter_bytes=MAX_ADAPTER_BYTES)
    fetcher = AdapterFetcher(open_store(f"s3://{BUCKET}/refuse", cfg), cfg)
    for name in ("bad-pickle", "bad-no-config", "bad-size", "bad-no-weights"):
        status, pattern = BAD_CASES[name]
        with pytest.raises(InvalidAdapterError, match=pattern) as e:
            fetcher.fetch(name, 0)
        assert e.value.status_code == status
    with pytest.raises(AdapterNotFoundError, match="'ghost' not found: no files in the adapter store$"):
        fetcher.fetch("ghost", 0)
    assert fetcher.downloads == 0 and fetcher.disk.keys() == []


# ---- validation messages ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_dirs(tiny_assets, tmp_path_factory):
    return make_bad_adapters(tiny_assets.adapter_path("tenant-0"), tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_every_bad_adapter_gets_its_message(name, bad_dirs, base_shape):
    status, pattern = BAD_CASES[name]
    with pytest.raises(InvalidAdapterError) as e:
        load_lora_weights(name, bad_dirs[name], base_shape, max_rank=MAX_RANK, dtype=torch.float32,
                          max_bytes=MAX_ADAPTER_BYTES, base_mismatch="refuse")
    assert e.value.status_code == status == 422
    assert re.search(pattern, e.value.message), e.value.message


def test_base_model_mismatch_modes(bad_dirs, base_shape, tiny_assets, caplog):
    path = bad_dirs["bad-base"]
    kw = dict(max_rank=MAX_RANK, dtype=torch.float32)
    with caplog.at_level(logging.WARNING):
        w = load_lora_weights("t", path, base_shape, base_mismatch="warn", **kw)
    assert len(w.warnings) == 1 and "does not match the served base 'demo-base'" in w.warnings[0]
    assert "served anyway" in caplog.text
    assert load_lora_weights("t", path, base_shape, base_mismatch="ignore", **kw).warnings == []
    # An alias of the served base (its hub ID, say) is accepted, in any case and path form.
    ok = load_lora_weights("t", path, base_shape, base_mismatch="refuse", base_aliases=["/models/LLAMA-2-13B-HF/"], **kw)
    assert ok.warnings == []
    # The demo adapters name their base by folder name: a match with the served folder's path.
    good = load_lora_weights("t", tiny_assets.adapter_path("tenant-1"), base_shape, base_mismatch="refuse", **kw)
    assert good.warnings == [] and good.rank == 8


def test_store_config_in_app_config():
    cfg = AppConfig.model_validate({"store": {"ram_cache_bytes": 0, "base_model_mismatch": "refuse",
                                              "storage_options": {"anon": True}}})
    assert cfg.store.ram_cache_bytes == 0 and cfg.store.base_model_mismatch == "refuse"
    with pytest.raises(ValueError, match="extra"):
        AppConfig.model_validate({"store": {"ram_cache_byte": 1}})
    for name, f in StoreConfig.model_fields.items():
        assert f.description, name
