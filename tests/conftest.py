import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (os.path.join(ROOT, "backend"), os.path.join(ROOT, "tests"), os.path.join(ROOT, "client")):
    if p not in sys.path:
        sys.path.insert(0, p)

# Without CUDA the Triton kernels run on CPU tensors through the interpreter. TRITON_INTERPRET
# is read when triton is imported, and any test module collected before tests/kernels may
# import it (through torch.onnx, transformers or the engine): so it is set here, first.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Engine cores started by this test run (tests/core, every e2e server) put their sockets in a
# runtime directory of this run alone, so concurrent runs of one user never share a core.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "TRITONKV_RUNTIME_DIR" not in os.environ:
    os.environ["TRITONKV_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="tkv-")
    atexit.register(shutil.rmtree, os.environ["TRITONKV_RUNTIME_DIR"], True)
