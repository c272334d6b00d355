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
