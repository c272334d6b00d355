# tritonkv: the engine lives in the tritonkv package (pip install tritonkv, or the repo's backend/).
import os, sys  # noqa: E401

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "backend"))
from tritonkv.server.triton_model import TritonPythonModel  # noqa: E402,F401
