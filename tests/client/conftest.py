import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (os.path.join(ROOT, "client"), os.path.join(ROOT, "loadtest"), os.path.join(ROOT, "tests", "e2e")):
    if p not in sys.path:
        sys.path.insert(0, p)

from shared_server import shared_server, stop_shared_server  # noqa: E402


@pytest.fixture(scope="session")
def e2e_server():
    """The session's shared server (tests/e2e/shared_server.py), the same one the e2e tests use."""
    yield shared_server()
    stop_shared_server()
