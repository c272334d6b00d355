import os

import pytest

from tiny_models import build_tiny_checkpoint


@pytest.fixture(scope="session", autouse=True)
def short_grace():
    """Cores started by these tests exit half a second after their last frontend left."""
    os.environ["TRITONKV_CORE_GRACE_S"] = "0.5"
    yield
    del os.environ["TRITONKV_CORE_GRACE_S"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("core-llama"))
    return path, build_tiny_checkpoint("llama", path)
