"""Servers given one pool name share one engine core, also when each runs tritonserver with a
private /dev/shm (``server/private_shm.py``): the core's socket is not in /dev/shm but in the
runtime directory, which a process in that namespace must name as the launcher does (a
non-root user is uid 0 there, ``unshare --map-root-user``)."""

import subprocess
import sys

import pytest

from tritonkv.core.runtime_dir import runtime_dir
from tritonkv.server.private_shm import command_prefix
from tritonkv.server.tritonserver_env import server_env


def test_a_server_in_a_private_dev_shm_finds_the_launchers_runtime_dir():
    prefix = command_prefix()
    if prefix is None:
        pytest.skip("this system allows no mount namespaces (the host's /dev/shm is used)")
    probe = "from tritonkv.core.runtime_dir import runtime_dir; print(runtime_dir())"
    out = subprocess.run(list(prefix) + [sys.executable, "-c", probe], env=server_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == runtime_dir()
