"""Adapter loading under races and hostile files, and off the engine thread (issue 25, items 5 and 9).

* "Refused for good": the node's disk cache evicting an adapter's folder between its config
  parse and its tensor parse made the loader remember that version as invalid (a 422 on the
  replica until a restart). A file that vanishes during a parse is a miss, fetched again; only
  refusals about the content are remembered.
* The tensor parse and validation (an 86 MB safetensors header took 825 ms) ran on the engine
  thread, stalling every tenant's decode. It runs on the loader's parse thread now, with numpy
  (no torch kernel: no second OpenMP team beside the engine's); only the pool copy is on the
  engine thread. A safetensors header over the limit is refused from its 8-byte length field.

S3 runs against moto's server on 127.0.0.1 (tests/moto_s3.py), in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from serve_app.adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.arch import BaseShape
from serve_app.engine.lora.weights import load_adapter_tensors, load_lora_weights, parse_adapter_config
from serve_app.engine.sampling import SamplingParams
from serve_app.errors import AdapterStoreUnavailableError, InvalidAdapterError
from tests.bad_adapters import make_bad_adapters
from tests.moto_s3 import S3Server

BUCKET = "bkt-loading"


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


def _s3_deployment(s3, tmp_path, tiny_assets, sources: dict[str, Path]):
    """A LoRA replica over a fresh S3 prefix where each adapter of ``sources`` is registered as v1."""
    from serve_app.adapters.registry import AdapterRegistry
    from serve_app.deployments.lora import LoRADeployment

    prefix = f"p{time.monotonic_ns()}"
    for name, src in sources.items():
        s3.upload_dir(src, BUCKET, f"{prefix}-src/{name}")
    dep = LoRADeployment({
        "base_model": str(tiny_assets.base), "adapters": f"s3://{BUCKET}/{prefix}", "max_lora_rank": 32,
        "torch_threads": 1,
        "store": {"storage_options": s3.storage_options, "disk_cache_dir": str(tmp_path / "cache")},
    })
    reg: AdapterRegistry = dep.registry
    for name in sources:
        reg.commit(name, 1, reg.stage(name, 1, f"s3://{BUCKET}/{prefix}-src/{name}"))
    return dep


def _evict(dep, mux: str) -> None:
    """What another replica's download does to the node's disk cache: evict this version's folder."""
    adapter_id, version = mux.split("@v")
    assert dep.fetcher.disk.remove(dep.fetcher._key(dep.registry.version_rel(adapter_id, int(version))))


# ---- 5. a vanished file is a miss, never a remembered refusal ----------------------------------------


def test_eviction_between_the_two_parses_is_fetched_again(s3, tmp_path, tiny_assets):
    dep = _s3_deployment(s3, tmp_path, tiny_assets, {"t": tiny_assets.adapter_path("tenant-1")})
    try:
        real = dep.loader._parse_config
        calls = []

        def parse_then_evicted(mux, path):
            spec = real(mux, path)
            calls.append(path)
            if len(calls) == 1:
                _evict(dep, mux)  # the folder goes between the config parse and the tensor parse
            return spec

        dep.loader._parse_config = parse_then_evicted
        weights, tier, _ = asyncio.run(dep._weights("t@v1"))
        assert weights.rank == 8 and tier == "s3"
        assert len(calls) == 2 and dep.fetcher.downloads == 2, "the vanished copy was not fetched again"
        assert dep.loader.refused == []
        # Nothing remembered: the replica keeps serving the version, from what it parsed.
        assert asyncio.run(dep._weights("t@v1"))[0] is weights and dep.fetcher.downloads == 2
    finally:
        dep.engine.shutdown()


def test_a_copy_that_keeps_vanishing_is_a_503_to_retry_not_a_remembered_422(s3, tmp_path, tiny_assets):
    dep = _s3_deployment(s3, tmp_path, tiny_assets, {"t": tiny_assets.adapter_path("tenant-1")})
    try:
        real = dep.loader._load_tensors
        evicting = [True]

        def evicted_then_parsed(spec, path):
            if evicting[0]:
                _evict(dep, spec.adapter_id)  # a disk cache too small for the node's traffic
            return real(spec, path)

        dep.loader._load_tensors = evicted_then_parsed
        with pytest.raises(AdapterStoreUnavailableError) as e:
            asyncio.run(dep._weights("t@v1"))
        assert e.value.status_code == 503
        assert re.search(r"adapter 't' version 1: its local copy was removed while it was read, 4 times in a row "
                         r".*retry.*raise store\.disk_cache_bytes", e.value.message), e.value.message
        assert dep.loader.refused == []
        evicting[0] = False  # the cache calms down: the next request is served
        assert asyncio.run(dep._weights("t@v1"))[0].rank == 8
    finally:
        dep.engine.shutdown()


def test_a_bad_adapter_is_still_refused_once_and_remembered(s3, tmp_path, tiny_assets):
    bad = make_bad_adapters(tiny_assets.adapter_path("tenant-0"), tmp_path / "bad")
    dep = _s3_deployment(s3, tmp_path, tiny_assets, {"nan": bad["bad-nan"], "shape": bad["bad-shape"]})
    try:
        parses = []
        real = dep.loader._load_tensors
        dep.loader._load_tensors = lambda spec, path: (parses.append(spec.adapter_id), real(spec, path))[1]
        for mux, pattern in (("nan@v1", "has NaN or inf values"), ("shape@v1", "do not fit the base projection")):
            for _ in range(2):
                with pytest.raises(InvalidAdapterError, match=pattern) as e:
                    asyncio.run(dep._weights(mux))
                assert e.value.status_code == 422
        assert parses == ["nan@v1", "shape@v1"] and dep.fetcher.downloads == 2, "a refusal was not remembered"
        assert dep.loader.refused == ["nan@v1", "shape@v1"]
    finally:
        dep.engine.shutdown()


def test_a_file_missing_from_a_folder_given_by_path_is_still_a_422(tiny_assets, tmp_path):
    bad = make_bad_adapters(tiny_assets.adapter_path("tenant-0"), tmp_path / "bad")
    base = BaseShape(num_layers=2, kinds={"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32),
                                          "o_proj": (64, 64)})
    for name, missing in (("bad-no-config", CONFIG_NAME), ("bad-no-weights", WEIGHTS_NAME)):
        with pytest.raises(InvalidAdapterError, match=re.escape(f"{missing} is missing")) as e:
            load_lora_weights(name, bad[name], base, max_rank=32, dtype=torch.float32)
        assert e.value.status_code == 422


# ---- 9. safetensors headers are bounded before they are read ----------------------------------------


def _tiny_base() -> BaseShape:
    return BaseShape(num_layers=2, kinds={"q_proj": (64, 64), "v_proj": (64, 32)})


def _write_adapter(folder: Path, tensors: dict, *, metadata: dict | None = None, r: int = 4, alpha: float = 8,
                   **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_NAME, metadata=metadata)
    (folder / CONFIG_NAME).write_text(json.dumps({"r": r, "lora_alpha": alpha, "peft_type": "LORA", **config}))
    return folder


def _lora_tensors(base: BaseShape, r: int, dtype=torch.float32, scale=1.0) -> dict:
    out = {}
    for layer in range(base.num_layers):
        for kind, (i, o) in base.kinds.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{kind}"
            out[f"{key}.lora_A.weight"] = (torch.randn(r, i) * scale).to(dtype)
            out[f"{key}.lora_B.weight"] = (torch.randn(o, r) * scale).to(dtype)
    return out


def test_an_oversized_safetensors_header_is_refused_unread(tmp_path):
    base = _tiny_base()
    folder = tmp_path / "huge-header"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    # A header length field of 100 MB and no header at all: refused from the 8 bytes alone.
    (folder / WEIGHTS_NAME).write_bytes((100 << 20).to_bytes(8, "little"))
    with pytest.raises(InvalidAdapterError) as e:
        load_lora_weights("huge", folder, base, max_rank=32, dtype=torch.float32)
    assert e.value.status_code == 422
    assert re.search(r"adapter 'huge': adapter_model\.safetensors declares a 104857600-byte header .*more than the "
                     r"limit 1048576; .*raise store\.max_safetensors_header_bytes", e.value.message), e.value.message

    # A well-formed file whose header (2 MB of metadata) is over the limit: the same refusal;
    # under a raised limit it loads.
    fat = _write_adapter(tmp_path / "fat", _lora_tensors(base, 4), metadata={"junk": "x" * (2 << 20)})
    with pytest.raises(InvalidAdapterError, match=r"declares a \d+-byte header .*more than the limit 1048576"):
        load_lora_weights("fat", fat, base, max_rank=32, dtype=torch.float32)
    w = load_lora_weights("fat", fat, base, max_rank=32, dtype=torch.float32, max_header_bytes=4 << 20)
    assert w.rank == 4


@pytest.mark.parametrize("blob,reason", [
    (b"\x05\x00", r"shorter than the 8-byte header length"),
    ((64).to_bytes(8, "little") + b"{}", r"header length 64 runs past the end of the file"),
    ((2).to_bytes(8, "little") + b"[]", r"header is not a JSON object"),
    ((4).to_bytes(8, "little") + b"\xff\xfe{}", r"header is not valid JSON"),
])
def test_malformed_safetensors_files_are_refused_with_the_reason(tmp_path, blob, reason):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (folder / WEIGHTS_NAME).write_bytes(blob)
    with pytest.raises(InvalidAdapterError, match=r"adapter_model\.safetensors could not be read \(.*" + reason):
        load_lora_weights("bad", folder, _tiny_base(), max_rank=32, dtype=torch.float32)


def test_offsets_outside_the_data_are_refused(tmp_path):
    folder = _write_adapter(tmp_path / "a", _lora_tensors(_tiny_base(), 4))
    raw = (folder / WEIGHTS_NAME).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 1 << 30
    blob = json.dumps(header).encode()
    (folder / WEIGHTS_NAME).write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
    with pytest.raises(InvalidAdapterError, match=r"could not be read \(tensor .* data offsets outside"):
        load_lora_weights("a", folder, _tiny_base(), max_rank=32, dtype=torch.float32)


# ---- the numpy parse holds exactly what the torch parse held ----------------------------------------


def _torch_reference(spec, tensors: dict, base: BaseShape, dtype: torch.dtype) -> dict:
    """The pool layout as the torch parse built it: a.to(dtype), (b.double().t() * scale).to(dtype)."""
    out = {}
    for kind, (i, o) in base.kinds.items():
        a_k = torch.zeros(base.num_layers, spec.r, i, dtype=dtype)
        b_k = torch.zeros(base.num_layers, spec.r, o, dtype=dtype)
        for layer in range(base.num_layers):
            key = f"base_model.model.model.layers.{layer}.self_attn.{kind}"
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            a_k[layer] = a.to(dtype)
            b_k[layer] = (b.double().t() * spec.scale_for(layer, kind, a.shape[0])).to(dtype)
        out[kind] = (a_k, b_k)
    return out


@pytest.mark.parametrize("pool", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_numpy_parse_equals_the_torch_casts_bit_for_bit(tmp_path, pool, stored):
    torch.manual_seed(3)
    base = _tiny_base()
    tensors = _lora_tensors(base, 8, stored, scale=0.3)
    folder = _write_adapter(tmp_path / "a", tensors, r=8, alpha=13.7, alpha_pattern={"v_proj": 3.3})
    spec = parse_adapter_config("a", folder, base, max_rank=32)
    w = load_adapter_tensors(spec, folder, base, max_rank=32, dtype=pool)
    ref = _torch_reference(spec, tensors, base, pool)
    for kind, (a, b) in ref.items():
        assert w.a[kind].dtype == w.b[kind].dtype == pool
        assert torch.equal(w.a[kind], a) and torch.equal(w.b[kind], b), kind
    assert w.raw_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


# ---- 9. the tensor parse is off the engine thread ------------------------------------------------------


def test_engine_load_adapter_parses_tensors_off_the_engine_thread(tiny_assets, monkeypatch):
    from serve_app.config import EngineConfig
    from serve_app.engine import offline as engine_mod  # load_adapter's home (the offline API)

    seen = []
    real = engine_mod.load_adapter_tensors

    def recording(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "load_adapter_tensors", recording)
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=4))
    try:
        eng.load_adapter("tenant-1", str(tiny_assets.adapter_path("tenant-1")))
        assert seen and "lora-engine" not in seen, seen
        assert eng.resident_adapters() == ["tenant-1"]
    finally:
        eng.shutdown()


def test_decode_steps_run_while_an_adapter_is_parsed(tiny_assets, tmp_path):
    """The replica's load path: a parse in progress (held until the engine makes progress) does
    not hold the engine thread, so another tenant's running request keeps decoding."""
    import shutil

    from serve_app.deployments.lora import LoRADeployment

    root = tmp_path / "store"
    shutil.copytree(tiny_assets.adapter_path("tenant-1"), root / "t")
    dep = LoRADeployment({"base_model": str(tiny_assets.base), "adapters": str(root), "max_lora_rank": 32,
                          "torch_threads": 1})
    engine = dep.engine
    try:
        real = dep.loader._load_tensors
        seen = {}

        def slow_parse(spec, path):
            seen["thread"] = threading.current_thread().name
            start = engine.steps
            deadline = time.monotonic() + 10
            while engine.steps < start + 5 and time.monotonic() < deadline:
                time.sleep(0.005)
            seen["steps"] = engine.steps - start
            return real(spec, path)

        dep.loader._load_tensors = slow_parse
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        stream = threading.Thread(target=engine.generate_batch, args=([([1, 5, 9, 13], params, None)],), daemon=True)
        stream.start()
        t0 = time.monotonic()
        while engine.steps < 2 and time.monotonic() - t0 < 30:
            time.sleep(0.005)
        weights, _, _ = asyncio.run(dep._weights("t"))
        assert weights.rank == 8
        assert seen["thread"].startswith("adapter-parse"), seen
        assert seen["steps"] >= 5, f"the engine made {seen['steps']} decode steps during a 10 s parse"
        stream.join(60)
    finally:
        engine.shutdown()


_NO_OMP_TEAM = r"""
import os, sys, threading, json, tempfile, time
from pathlib import Path
import torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[1])
from serve_app.engine.arch import BaseShape
from serve_app.engine.lora.weights import load_adapter_tensors, parse_adapter_config

torch.set_num_threads(2)
def threads():
    return len(os.listdir("/proc/self/task"))
x = torch.randn(512, 512)
(x * 2).sum()  # the main thread's OpenMP team ("the engine's")
base = BaseShape(num_layers=2, kinds={"q_proj": (1024, 1024)})
d = Path(tempfile.mkdtemp())
t = {}
for layer in range(2):
    k = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
    t[k + ".lora_A.weight"] = torch.randn(64, 1024).to(torch.bfloat16)
    t[k + ".lora_B.weight"] = torch.randn(1024, 64).to(torch.bfloat16)
save_file(t, d / "adapter_model.safetensors")
(d / "adapter_config.json").write_text(json.dumps({"r": 64, "lora_alpha": 16}))
spec = parse_adapter_config("t", d, base, max_rank=64)

def run(fn):
    # threads alive after fn ran on a worker that stays alive (as an executor's does), but it
    done, release = threading.Event(), threading.Event()

    def worker():
        fn()
        done.set()
        release.wait(30)

    th = threading.Thread(target=worker)
    th.start()
    done.wait(60)
    time.sleep(0.2)
    n = threads() - 1
    release.set()
    th.join()
    return n

work = {
    "parse": lambda: load_adapter_tensors(spec, d, base, max_rank=64, dtype=torch.bfloat16),
    "torch_op": lambda: torch.isfinite(torch.randn(1024, 1024)).all(),  # the control
}[sys.argv[2]]
before = threads()
print(json.dumps({"before": before, "after": run(work)}))
"""


def _threads_left(what: str) -> dict:
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", _NO_OMP_TEAM, root, what], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_parse_starts_no_second_openmp_team():
    """A torch kernel on a second thread starts a second OpenMP team (its threads stay); the
    parse runs beside the engine thread, so it must not (see LoRAEngine's docstring)."""
    control = _threads_left("torch_op")
    assert control["after"] > control["before"], f"the control (a torch op on a second thread) left no thread: {control}"
    got = _threads_left("parse")
    assert got["after"] == got["before"], f"the parse left threads behind (an OpenMP team): {got}"
