import os
import uuid

import pytest

from tritonkv.cache.pool_admin import remove_pool_files


@pytest.fixture
def pool_name():
    """A pool name no other test (or concurrent run) uses; its files are removed afterwards,
    whatever the test did."""
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    remove_pool_files(name, keep_lock=False)
