import pytest

from shared_server import shared_server, stop_shared_server


@pytest.fixture(scope="session")
def e2e_server():
    """The session's shared server (tests/e2e/shared_server.py)."""
    yield shared_server()
    stop_shared_server()
