"""Which tritonserver runs and with what environment (checked on tritonserver 2.51).

Traps handled:
- the Python backend stub must match the running interpreter (``install_backend`` copies
  the stub for this Python);
- the stub takes site-packages from the venv of the first ``python3`` on PATH, so this
  interpreter's bin directory goes first on PATH;
- the stub links the first libpython3.X.so.1.0 the loader finds, so this interpreter's
  LIBDIR goes first on LD_LIBRARY_PATH.
``$TRITONSERVER`` names another server binary (e.g. an unpacked server on a GPU machine;
its environment is then kept), ``$TRITON_BACKENDS`` a backend directory already prepared.
"""

from __future__ import annotations

import os
import sys
import sysconfig

from tritonkv.core.runtime_dir import ENV as RUNTIME_DIR_ENV
from tritonkv.core.runtime_dir import runtime_dir
from tritonkv.server.install_backend import pytriton_dir


def tritonserver_binary() -> str:
    """$TRITONSERVER if set, else the nvidia-pytriton wheel's."""
    return os.environ.get("TRITONSERVER") or os.path.join(pytriton_dir(), "bin", "tritonserver")


def server_env() -> dict:
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    if not os.environ.get("TRITONSERVER"):
        libs.append(os.path.join(os.path.dirname(os.path.dirname(pytriton_dir())), "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")])
    if not os.environ.get("TRITONSERVER"):  # a prepared server environment keeps its own PATH
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    # the engine cores' runtime directory as this process names it: inside the private /dev/shm
    # namespace a non-root user is uid 0 (``unshare --map-root-user``) and would otherwise look
    # in /tmp/tritonkv-0, so servers given one pool name would not find each other's core
    env[RUNTIME_DIR_ENV] = runtime_dir()
    return env
