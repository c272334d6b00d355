"""Start a real tritonserver (the one shipped in the nvidia-pytriton wheel) on the repository.

Known traps this module handles (checked on tritonserver 2.51):
- the Python backend stub must match the running interpreter: the stub for this Python is
  copied next to libtriton_python.so in a private backend directory;
- the stub takes site-packages from the venv of the first ``python3`` on PATH, so this
  interpreter's bin directory goes first on PATH;
- the stub links the first libpython3.X.so.1.0 the loader finds, so this interpreter's
  LIBDIR goes first on LD_LIBRARY_PATH.
The launcher binds to loopback unless told otherwise, waits until the server is ready and
stops it cleanly on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_REPOSITORY = os.path.join(ROOT, "model_repository")


def pytriton_dir() -> str:
    try:
        import pytriton
    except ImportError:
        raise SystemExit("tritonserver not found: pip install nvidia-pytriton (it ships tritonserver 2.51)") from None
    return os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")


def tritonserver_binary() -> str:
    """$TRITONSERVER if set (e.g. an unpacked server on a GPU machine), else pytriton's."""
    return os.environ.get("TRITONSERVER") or os.path.join(pytriton_dir(), "bin", "tritonserver")


def prepare_backend_dir(dest: str) -> str:
    """A backend directory whose python/ holds the stub for this interpreter
    ($TRITON_BACKENDS if set: a directory already prepared that way)."""
    if os.environ.get("TRITON_BACKENDS"):
        return os.environ["TRITON_BACKENDS"]
    src = pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = os.path.join(src, "python_backend_stubs", version, "triton_python_backend_stub")
    if not os.path.isfile(stub):
        raise SystemExit(f"no Triton Python backend stub for Python {version} in {src}")
    py_dir = os.path.join(dest, "python")
    os.makedirs(py_dir, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(os.path.join(src, "backends", "python", name), py_dir)
    shutil.copy2(stub, py_dir)
    return dest


def server_env() -> dict:
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    if not os.environ.get("TRITONSERVER"):
        libs.append(os.path.join(os.path.dirname(os.path.dirname(pytriton_dir())), "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")])
    if not os.environ.get("TRITONSERVER"):  # a prepared server environment keeps its own PATH
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    # the stub ignores PYTHONPATH for site-packages, but model.py finds backend/ itself
    return env


def write_repository(dest: str, source: str, checkpoint: str | None, instances: int,
                     extra_params: dict | None, instance_kind: str) -> str:
    """Copy ``source`` to ``dest`` with parameters and instance counts rewritten."""
    shutil.copytree(source, dest, dirs_exist_ok=True)
    backend = os.path.join(ROOT, "backend")
    for model in sorted(os.listdir(dest)):
        cfg_path = os.path.join(dest, model, "config.pbtxt")
        if not os.path.isfile(cfg_path):
            continue
        text = open(cfg_path).read()
        params = dict(extra_params or {})
        if checkpoint is not None:
            params["checkpoint"] = checkpoint
        for key, value in params.items():
            text = set_parameter(text, key, str(value))
        text = re.sub(r"instance_group \[.*?\]",
                      f"instance_group [ {{ count: {instances} kind: {instance_kind} }} ]", text, flags=re.S)
        with open(cfg_path, "w") as f:
            f.write(text)
        model_py = os.path.join(dest, model, "1", "model.py")
        if os.path.isfile(model_py):  # the copy lives elsewhere: point it at this checkout
            code = open(model_py).read().replace(
                'os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "backend")',
                repr(backend))
            with open(model_py, "w") as f:
                f.write(code)
    return dest


def set_parameter(pbtxt: str, key: str, value: str) -> str:
    entry = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
    pattern = re.compile(r'parameters \{ key: "' + re.escape(key) + r'" value: \{ string_value: "[^"]*" \} \}')
    if pattern.search(pbtxt):
        return pattern.sub(lambda _: entry, pbtxt)
    return pbtxt.rstrip() + "\n" + entry + "\n"


def live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (an orphan's zombie waits for init)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def remove_stale_pools(pool_names) -> None:
    """Remove the /dev/shm files of these pools (on every device) that no live process holds."""
    from tritonkv.cache.pool_admin import device_pools, remove_if_stale

    for pool_name in pool_names:
        for name in device_pools(pool_name):
            with contextlib.suppress(OSError):
                remove_if_stale(name)


def repository_pool_names(repo: str) -> tuple[str, ...]:
    names = set()
    for model in os.listdir(repo):
        cfg_path = os.path.join(repo, model, "config.pbtxt")
        if os.path.isfile(cfg_path):
            m = re.search(r'key: "pool_name" value: \{ string_value: "([^"]*)" \}', open(cfg_path).read())
            if m and m.group(1):
                names.add(m.group(1))
    return tuple(sorted(names))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    workdir: str
    pool_names: tuple[str, ...] = ()  # config.pbtxt pool_name values of the served models

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}; "
                                   f"see {self.workdir}/server.log")
            if self.is_ready():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout_s}s; see {self.workdir}/server.log")

    def stop(self, timeout_s: float = 30) -> None:
        """Graceful stop; then end whatever the server left behind. A model whose sequence
        batcher still holds an open conversation does not unload before tritonserver's exit
        timeout, and its Python stub outlives the server: the launcher started the server in
        its own process group, so the group is killed, and pools nobody holds are removed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # tritonserver's graceful shutdown
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while live_group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # SIGKILL lands asynchronously; a pool is stale only once they are gone
        remove_stale_pools(self.pool_names)

    def log(self) -> str:
        with open(os.path.join(self.workdir, "server.log"), errors="replace") as f:
            return f.read()


def launch(checkpoint: str | None = None, *, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
           instances: int = 1, host: str = "127.0.0.1", repository: str = DEFAULT_REPOSITORY,
           extra_params: dict | None = None, instance_kind: str | None = None,
           ready_timeout_s: float = 300, log_to_console: bool = False, exit_timeout_s: int = 10) -> Server:
    from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

    if checkpoint is None:
        checkpoint = ensure_demo_checkpoint()  # once, before instances race for it
    checkpoint = os.path.abspath(checkpoint)
    if instance_kind is None:
        instance_kind = "KIND_CPU"
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                instance_kind = "KIND_GPU"
    workdir = tempfile.mkdtemp(prefix="tritonkv-server-")
    repo = write_repository(os.path.join(workdir, "model_repository"), repository, checkpoint,
                            instances, extra_params, instance_kind)
    backends = prepare_backend_dir(os.path.join(workdir, "backends"))
    ports = [p or free_port() for p in (http_port, grpc_port, metrics_port)]
    cmd = [tritonserver_binary(),
           f"--model-repository={repo}", f"--backend-directory={backends}",
           f"--http-address={host}", f"--http-port={ports[0]}",
           f"--grpc-address={host}", f"--grpc-port={ports[1]}",
           f"--metrics-address={host}", f"--metrics-port={ports[2]}",
           "--allow-metrics=true", "--log-info=true", "--exit-on-error=true",
           f"--exit-timeout-secs={exit_timeout_s}"]
    out = None if log_to_console else open(os.path.join(workdir, "server.log"), "w")
    proc = subprocess.Popen(cmd, env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = Server(proc, host, *ports, workdir, repository_pool_names(repo))
    server.wait_ready(ready_timeout_s)
    return server


@contextlib.contextmanager
def start_server(checkpoint: str | None = None, **kwargs):
    """``with start_server() as server:`` a ready server on free loopback ports, stopped after."""
    server = launch(checkpoint, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def serve_forever(args) -> int:
    server = launch(args.checkpoint, http_port=args.http_port, grpc_port=args.grpc_port,
                    metrics_port=args.metrics_port, instances=args.instances, host=args.host,
                    log_to_console=args.verbose)
    stop = {"now": False}

    def on_signal(signum, _frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"tritonkv ready (models llm, llm_stateless; checkpoint {args.checkpoint or 'demo'})")
    print(f"  HTTP    http://{server.http_url}")
    print(f"  gRPC    {server.grpc_url}")
    print(f"  metrics {server.metrics_url}")
    print(f"  log     {server.workdir}/server.log")
    print(f"  try:    curl -s http://{server.http_url}/v2/models/llm_stateless/generate "
          "-d '{\"text_input\": \"Hello\", \"max_tokens\": 16}'")
    print(f"  chat:   tritonkv-chat --url {server.grpc_url}")
    sys.stdout.flush()
    while not stop["now"] and server.process.poll() is None:
        time.sleep(0.5)
    server.stop()
    return 0 if stop["now"] else (server.process.returncode or 1)
