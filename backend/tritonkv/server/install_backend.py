"""``tritonkv install-backend DIR``: tritonkv as a Python-based Triton backend, the form
Triton's vLLM backend takes.

A backend directory then holds:
- ``DIR/tritonkv/model.py``: imports ``tritonkv.server.triton_model.TritonPythonModel``
  (tritonkv comes from the Python the stub runs; if that Python cannot import it, from the
  directory it was installed from, recorded here at install time);
- ``DIR/python/``: Triton's Python backend (``libtriton_python.so``, its utils and the stub
  for this interpreter), copied from the nvidia-pytriton wheel unless the directory already
  has one (the official container's ``/opt/tritonserver/backends/python``: kept as it is).
A model is then a ``config.pbtxt`` saying ``backend: "tritonkv"`` with its parameters and an
empty version directory; ``tritonserver --model-repository R --backend-directory DIR``
serves it. The launcher installs the same backend into each server's work folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import tritonkv

BACKEND_NAME = "tritonkv"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB = "triton_python_backend_stub"

MODEL_PY = '''"""tritonkv as a Python-based Triton backend (written by `tritonkv install-backend`).
A model whose config.pbtxt says backend: "tritonkv" runs this class; its engine settings are
that config's parameters (backend/tritonkv/config.py)."""
import sys

try:
    import tritonkv  # noqa: F401  (installed into the Python the stub runs)
except ImportError:  # else the package the backend was installed from
    sys.path.insert(0, {package_parent!r})
from tritonkv.server.triton_model import TritonPythonModel  # noqa: E402,F401
'''


def pytriton_dir() -> str:
    try:
        import pytriton
    except ImportError:
        raise SystemExit("tritonserver not found: pip install nvidia-pytriton (it ships tritonserver 2.51)") from None
    return os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")


def install_python_backend(dest: str) -> str:
    """``dest/python`` with the Python backend and the stub for this interpreter (from
    nvidia-pytriton); left as it is when it already holds a Python backend."""
    py_dir = os.path.join(dest, "python")
    if os.path.isfile(os.path.join(py_dir, PYTHON_BACKEND_FILES[0])):
        return py_dir
    src = pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = os.path.join(src, "python_backend_stubs", version, STUB)
    if not os.path.isfile(stub):
        raise SystemExit(f"no Triton Python backend stub for Python {version} in {src}")
    os.makedirs(py_dir, exist_ok=True)
    for name in PYTHON_BACKEND_FILES:
        shutil.copy2(os.path.join(src, "backends", "python", name), py_dir)
    shutil.copy2(stub, py_dir)
    return py_dir


def install_backend(dest: str, python_backend: bool = True) -> str:
    """Install the tritonkv backend into the backend directory ``dest``; returns ``dest``."""
    dest = os.path.abspath(dest)
    own = os.path.join(dest, BACKEND_NAME)
    os.makedirs(own, exist_ok=True)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(tritonkv.__file__)))
    with open(os.path.join(own, "model.py"), "w") as f:
        f.write(MODEL_PY.format(package_parent=package_parent))
    if python_backend:
        install_python_backend(dest)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tritonkv install-backend", description=__doc__.split("\n\n")[0])
    p.add_argument("backend_dir", metavar="DIR", help="Triton's backend directory (tritonserver --backend-directory), "
                   "e.g. /opt/tritonserver/backends")
    p.add_argument("--no-python-backend", action="store_true",
                   help="install only DIR/tritonkv (DIR/python must then hold a Python backend whose stub "
                        "matches the Python tritonkv is installed in)")
    args = p.parse_args(argv)
    dest = install_backend(args.backend_dir, python_backend=not args.no_python_backend)
    print(f"tritonkv backend installed in {dest}/{BACKEND_NAME} (Python backend: {dest}/python)")
    print(f'models say backend: "{BACKEND_NAME}"; run tritonserver --model-repository R --backend-directory {dest}')
    return 0
