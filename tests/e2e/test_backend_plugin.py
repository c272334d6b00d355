"""tritonkv in its plugin form, as Triton's vLLM backend is used: `tritonkv install-backend
DIR`, then the packaged tritonserver binary (nvidia-pytriton's) run by hand with nothing but
--model-repository and --backend-directory on a folder holding only the model repository
(config.pbtxt with backend: "tritonkv" and an empty version directory per model; the
checkpoint set in one place per model). No launcher, no PYTHONPATH: greedy tokens equal HF's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request

import pytest
import torch

from polling import wait_until
from tiny_models import hf_greedy
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
from tritonkv.server.install_backend import pytriton_dir
from tritonkv.server.ports import check_ports_free
from tritonkv.server.repository import set_parameter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POOL = f"plugin-test-{os.getpid()}"
# plain tritonserver names the backend's regions "triton_<backend>_backend_shm_region_<uuid>"
REGION_PREFIX = "triton_tritonkv_backend_shm_region_"


def shm_names():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def plain_tritonserver(tmp_path_factory):
    work = tmp_path_factory.mktemp("plugin")
    models = work / "models"
    shutil.copytree(os.path.join(ROOT, "model_repository"), models)
    for model in ("llm", "llm_stateless"):
        assert sorted(os.listdir(models / model)) == ["1", "config.pbtxt"]
        assert [f for f in os.listdir(models / model / "1") if not f.startswith(".")] == []  # empty
        cfg = models / model / "config.pbtxt"
        text = cfg.read_text()
        assert 'backend: "tritonkv"' in text and "instance_group [" not in text
        text = set_parameter(text, "checkpoint", ensure_demo_checkpoint())  # the one place
        cfg.write_text(set_parameter(text, "pool_name", POOL))  # not "default": other servers may use it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the stub's python3 first on PATH: this interpreter, or $TRITONKV_STUB_PYTHON where the tests'
    # venv cannot host the stub (the GPU image: numpy 2 for the HF oracles, < 2 for the stub)
    stub_python = os.environ.get("TRITONKV_STUB_PYTHON", sys.executable)
    env["PATH"] = os.pathsep.join([os.path.dirname(stub_python), env.get("PATH", "")])
    installed = subprocess.run([stub_python, "-m", "tritonkv.server.cli", "install-backend", str(work / "backends")],
                               capture_output=True, text=True, env=env, timeout=60)
    assert installed.returncode == 0, installed.stderr
    assert sorted(os.listdir(work / "backends")) == ["python", "tritonkv"]
    libs = [os.path.join(os.path.dirname(os.path.dirname(pytriton_dir())), "nvidia_pytriton.libs"),
            sysconfig.get_config_var("LIBDIR")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")])
    ports = check_ports_free("127.0.0.1", {"http": 0, "grpc": 0, "metrics": 0})
    cmd = [os.path.join(pytriton_dir(), "bin", "tritonserver"), f"--model-repository={models}",
           f"--backend-directory={work / 'backends'}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
           "--metrics-address=127.0.0.1", f"--http-port={ports['http']}", f"--grpc-port={ports['grpc']}",
           f"--metrics-port={ports['metrics']}"]
    log = open(work / "server.log", "w")
    before = shm_names()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"127.0.0.1:{ports['http']}"

    def ready():
        assert proc.poll() is None, (work / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        assert wait_until(ready, 300, 0.2), (work / "server.log").read_text()[-3000:]
        yield url
    finally:  # as an operator stops it: SIGINT, tritonserver's graceful shutdown
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        # plain tritonserver has no launcher to clean up after it: what it left, the test removes
        for name in shm_names() - before:
            if name.startswith(REGION_PREFIX) or name.startswith(f"tritonkv-{POOL}-"):
                os.remove(os.path.join("/dev/shm", name))


def test_plain_tritonserver_with_the_installed_backend_gives_hf_greedy_tokens(plain_tritonserver):
    import transformers

    body = json.dumps({"text_input": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://{plain_tritonserver}/v2/models/llm_stateless/generate", data=body)
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.load(r)
    hf = transformers.LlamaForCausalLM.from_pretrained(ensure_demo_checkpoint(), dtype=torch.float32).eval()
    assert out["output_ids"] == hf_greedy(hf, [256] + list(b"Hello"), 8)[0]
    with urllib.request.urlopen(f"http://{plain_tritonserver}/v2/models/llm/config", timeout=30) as r:
        config = json.load(r)
    kind = "KIND_GPU" if torch.cuda.is_available() else "KIND_CPU"  # Triton's choice: no instance_group set
    assert config["backend"] == "tritonkv" and config["instance_group"][0]["kind"] == kind
