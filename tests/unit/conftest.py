import pytest

from serve_app.demo import build_demo_assets
from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from tests.helpers import TINY


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("demo"), **TINY)


@pytest.fixture(scope="session")
def two_adapter_engine(tiny_assets):
    """A small engine on the tiny assets with their first two adapters loaded (sampler tests: they
    only read it)."""
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=16))
    for aid in tiny_assets.adapter_ids[:2]:
        eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
    yield eng
    eng.shutdown()
