import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (os.path.join(ROOT, "backend"), os.path.join(ROOT, "tests"), os.path.join(ROOT, "client")):
    if p not in sys.path:
        sys.path.insert(0, p)

# Rule: pytest-xdist workers share the machine's cores: each worker, and every server or tool
# it starts (they inherit the environment), computes on cores / workers threads. Two workers of
# two threads each on a 2-core machine oversubscribe it (OpenMP threads spin on a busy core).
# Set before torch is imported; a thread count set by hand wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:
    _threads = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

# Without CUDA the Triton kernels run on CPU tensors through the interpreter. TRITON_INTERPRET
# is read when triton is imported, and any test module collected before tests/kernels may
# import it (through torch.onnx, transformers or the engine): so it is set here, first.
import torch  # noqa: E402

# Rule: on a machine with CUDA the engine tests run there unless TRITONKV_TEST_DEVICE=cpu is
# asked for, so a test that needs CUDA (graphs, auto-dispatch) runs wherever CUDA is.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("TRITONKV_TEST_DEVICE", "cuda")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

TEST_DEVICE = os.environ.get("TRITONKV_TEST_DEVICE", "cpu")
# Tests that run a tool the GPU machine cannot get (it reaches no registry, and aiperf's
# dependencies are too large to carry to it): skipped by name where the tool is missing.
NEEDS_MODULE = {"test_openai_aiperf.py": "aiperf", "test_loadtest_ci.py": "locust"}
# A skip reason that names the device: under TRITONKV_TEST_DEVICE=cuda such a skip is a failure
# (every CUDA variant must run on a GPU run; bench/gpu_run.sh check counts them).
_DEVICE_WORDS = ("cuda", "gpu", "tritonkv_test_device")


def pytest_configure(config):
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.exit("TRITONKV_TEST_DEVICE=cuda but torch sees no CUDA device", returncode=4)


def pytest_collection_modifyitems(config, items):
    missing = {name: mod for name, mod in NEEDS_MODULE.items() if importlib.util.find_spec(mod) is None}
    for item in items:
        mod = missing.get(os.path.basename(str(item.fspath)))
        if mod:
            item.add_marker(pytest.mark.skip(reason=f"needs {mod}, not installed on this machine"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if TEST_DEVICE == "cuda" and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if any(w in reason.lower() for w in _DEVICE_WORDS):
            report.outcome = "failed"
            report.longrepr = f"skipped on a CUDA run (every CUDA variant must run here): {reason}"


def pytest_runtest_logreport(report):
    """$TRITONKV_TEST_RECORD: one line per finished test (node id, outcome, seconds, reason),
    appended as it ends, so a run stopped by its time limit still shows what ran
    (bench/gpu_run.sh check; with pytest-xdist the controller writes every worker's)."""
    path = os.environ.get("TRITONKV_TEST_RECORD")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):  # an xdist worker: the controller writes
        return
    if report.when == "call" or (report.when == "setup" and not report.passed) or \
            (report.when == "teardown" and report.failed):
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[-1])
        elif report.failed:
            reason = str(report.longrepr).strip().splitlines()[-1] if report.longrepr else ""
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        with open(path, "a") as f:
            f.write(f"{report.nodeid}\t{outcome}\t{report.duration:.2f}\t{reason[:300]}\n")


# Engine cores started by this test run (tests/core, every e2e server) put their sockets in a
# runtime directory of this run alone, so concurrent runs of one user never share a core.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "TRITONKV_RUNTIME_DIR" not in os.environ:
    os.environ["TRITONKV_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="tkv-")
    atexit.register(shutil.rmtree, os.environ["TRITONKV_RUNTIME_DIR"], True)


@pytest.fixture(scope="module")
def hf_demo():
    """HF transformers on the generated demo checkpoint (float32): the oracle of the e2e and
    client tests, whose servers serve that checkpoint."""
    import torch
    import transformers

    from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

    return transformers.LlamaForCausalLM.from_pretrained(ensure_demo_checkpoint(), dtype=torch.float32).eval()
