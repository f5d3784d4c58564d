import pytest

from serve_app.demo import build_demo_assets
from tests.helpers import TINY


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("demo"), **TINY)
