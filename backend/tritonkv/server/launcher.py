"""Start a real tritonserver (the one shipped in the nvidia-pytriton wheel) on the repository.

Known traps this module handles (checked on tritonserver 2.51):
- the Python backend stub must match the running interpreter: the stub for this Python is
  copied next to libtriton_python.so in a private backend directory;
- the stub takes site-packages from the venv of the first ``python3`` on PATH, so this
  interpreter's bin directory goes first on PATH;
- the stub links the first libpython3.X.so.1.0 the loader finds, so this interpreter's
  LIBDIR goes first on LD_LIBRARY_PATH.
The launcher binds to loopback unless told otherwise, waits until the server is ready and
stops it on Ctrl-C / SIGTERM within a few seconds.

Security defaults (docs/security.md):
- Triton's shared-memory, model-repository, logging and trace APIs are restricted on HTTP
  and gRPC (``--http-restricted-api`` / ``--grpc-restricted-protocol``) to callers that send
  a random key made per start; the launcher keeps it (``Server.admin_key``, never printed)
  so it, and a supervisor, can still use model control (explicit mode, all models loaded);
- the server runs with umask 077, so what it and its stubs create is private to its user.

Private by default: the served models share a KV pool named ``server-<token>`` (one per
server: two servers never collide; the same ``pool_name`` given to both shares on purpose).
A stop removes the work folder (``tritonkv-server-<token>-*`` in the temp directory), this
server's Python backend regions and pools nobody holds (the next launch removes what a crashed
server of this launcher left: regions, private pools, work folders); a failed start raises ``ServerStartError``
whose message is the reason in one line (e.g. a pool mismatch), read from the server log.

OpenAI frontend (``openai_port`` not None): ``python -m tritonkv.openai_frontend`` runs as a
child process of the launcher, in a session of its own, a plain gRPC client of this server.
A separate process keeps its event loop and GIL off the launcher and off tritonserver, and a
crash there never takes tritonserver down: a watchdog thread restarts it on the same port.
It is stopped before tritonserver.

Shared-memory hygiene: the Python backend names its regions ``<prefix><uuid>`` in /dev/shm;
the launcher gives every server its own prefix ``triton_python_backend_shm_region_tritonkv-
<token>-`` and a lock file that only that server's processes hold, removes the regions after
a stop, and on each launch removes the regions of earlier servers of this launcher whose lock
nobody holds any more (a crash, a SIGKILL). Other names in /dev/shm are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_REPOSITORY = os.path.join(ROOT, "model_repository")

# Triton APIs only the launcher (and its supervisor) may call: they can read or write server
# memory (shared memory), load and unload models, and change logging / tracing.
RESTRICTED_APIS = ("shared-memory", "model-repository", "logging", "trace")
ADMIN_HEADER = "tritonkv-admin-key"  # HTTP header; gRPC metadata is "triton-grpc-protocol-" + this
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
# Python backend shared-memory regions: "<prefix><uuid>"; tritonserver's default prefix is
# "triton_python_backend_shm_region_", the launcher's servers use REGION_TAG + "<token>-"
REGION_DIR = "/dev/shm"
REGION_TAG = "triton_python_backend_shm_region_tritonkv-"
REGION_NAME_RE = re.compile(re.escape(REGION_TAG) + r"([0-9a-f]{16})(?:-[0-9a-f-]+|\.lock)$")
# the KV pool of one server unless a pool_name is given: "server-<token>" (cache/pool_file.py names)
PRIVATE_POOL_PREFIX = "server-"
PRIVATE_POOL_RE = re.compile(re.escape(PRIVATE_POOL_PREFIX) + r"[0-9a-f]{16}")
DEFAULT_OPENAI_PORT = 9000
# a server's work folder in the temp directory: "tritonkv-server-<token>-<random>"
WORKDIR_PREFIX = "tritonkv-server-"
WORKDIR_RE = re.compile(re.escape(WORKDIR_PREFIX) + r"([0-9a-f]{16})-[A-Za-z0-9_]+")


class ServerStartError(RuntimeError):
    """tritonserver (or its OpenAI frontend) did not come up; the message is the reason."""


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
    """Nothing to do: KV pools live in engine cores (core/), which remove their own files."""


def stale_private_pools() -> list[str]:
    """None: KV pools live in engine cores (core/), which remove their own files."""
    return []


def repository_pool_names(repo: str) -> tuple[str, ...]:
    names = set()
    for model in os.listdir(repo):
        cfg_path = os.path.join(repo, model, "config.pbtxt")
        if os.path.isfile(cfg_path):
            m = re.search(r'key: "pool_name" value: \{ string_value: "([^"]*)" \}', open(cfg_path).read())
            if m and m.group(1):
                names.add(m.group(1))
    return tuple(sorted(names))


def region_lock_path(token: str) -> str:
    return os.path.join(REGION_DIR, f"{REGION_TAG}{token}.lock")


def hold_region_lock(token: str) -> int:
    """Create and flock the lock file of ``token``'s regions; the fd goes to tritonserver
    (pass_fds): the lock is held while any process of that server keeps it open."""
    fd = os.open(region_lock_path(token), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_regions(token: str, wait_s: float = 0) -> list[str]:
    """Remove the Python backend regions of server ``token`` and its lock file, if nobody
    holds the lock (a server alive keeps it) within ``wait_s``. Returns the names removed."""
    lock = region_lock_path(token)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = None  # its lock is gone (made before any region, removed last): nobody runs
    except OSError:
        return []
    removed = []
    try:
        if fd is not None:
            if os.fstat(fd).st_uid != os.geteuid():
                return []
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        return []  # a process of that server is alive
                    time.sleep(0.01)
        prefix = f"{REGION_TAG}{token}-"
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(REGION_DIR)):
                path = os.path.join(REGION_DIR, name)
                if name.startswith(prefix) and REGION_NAME_RE.fullmatch(name):
                    with contextlib.suppress(FileNotFoundError, PermissionError):
                        if os.lstat(path).st_uid == os.geteuid():
                            os.remove(path)
                            removed.append(name)
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
                removed.append(os.path.basename(lock))
    finally:
        if fd is not None:
            os.close(fd)
    return removed


def remove_stale_regions() -> list[str]:
    """Remove what crashed servers of this launcher left in /dev/shm: the regions of every
    token whose lock no live process holds. Names of other servers are never touched."""
    try:
        names = os.listdir(REGION_DIR)
    except OSError:
        return []
    tokens = sorted({m.group(1) for m in map(REGION_NAME_RE.fullmatch, names) if m})
    removed = []
    for token in tokens:
        removed += remove_regions(token)
    return removed


def remove_stale_workdirs() -> list[str]:
    """Remove the work folders (``tritonkv-server-<token>-*`` in the temp directory, this
    user's) of servers of this launcher that are gone: their region lock is held by nobody or
    was removed. Folders of live servers and other names are never touched."""
    if not os.path.isdir(REGION_DIR):
        return []  # no locks to tell live from dead
    tmp = tempfile.gettempdir()
    removed = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(tmp)):
            m = WORKDIR_RE.fullmatch(name)
            path = os.path.join(tmp, name)
            if m is None or os.lstat(path).st_uid != os.geteuid() or not os.path.isdir(path):
                continue
            if not region_lock_held(m.group(1)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
    return removed


def region_lock_held(token: str) -> bool:
    """Whether a live process of server ``token`` holds its region lock."""
    try:
        fd = os.open(region_lock_path(token), os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: treat as alive
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def server_regions(token: str) -> list[str]:
    """Names in /dev/shm made for server ``token`` (its regions and lock)."""
    with contextlib.suppress(OSError):
        return sorted(n for n in os.listdir(REGION_DIR)
                      if n.startswith(f"{REGION_TAG}{token}") and REGION_NAME_RE.fullmatch(n))
    return []


# Triton's log lines that say why a model did not load, most specific first
_FAILURE_PATTERNS = (
    re.compile(r"failed to load '([^']+)' version \d+: (.+)$"),
    re.compile(r"(?:^|\] )(?:E\d{4} [^\]]*\] )?(.*(?:Error|Mismatch|Exception): .+)$"),
)


def failure_reason(log: str) -> str | None:
    """The reason a start failed, in one line, from tritonserver's log (None if not found)."""
    # Triton writes a Python traceback as literal "\n" sequences: the reason is the first line
    lines = [line.split("\\n", 1)[0] for line in log.splitlines()]
    for line in lines:
        m = _FAILURE_PATTERNS[0].search(line)
        if m:
            return f"model {m.group(1)!r} failed to load: {m.group(2).strip()}"
    for line in reversed(lines):
        m = _FAILURE_PATTERNS[1].search(line)
        if m:
            return m.group(1).strip()
    return None


def http_ok(url: str, timeout_s: float = 2) -> bool:
    """Whether ``url`` answers 200 (a readiness probe: no answer is not ready)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


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
    # the key that opens the restricted APIs (None: nothing restricted); never print it
    admin_key: str | None = field(default=None, repr=False)
    region_token: str | None = None  # its Python backend regions: REGION_TAG + token + "-<uuid>"
    exit_timeout_s: float = 1.5  # how long a stop lets in-flight requests finish
    openai: object | None = None  # its OpenAI frontend (openai_frontend.process.FrontendProcess)
    model_name: str | None = None  # the model name the OpenAI API reports

    @property
    def openai_url(self) -> str | None:
        """Base URL of the OpenAI API (``http://host:port/v1``), None when it is off."""
        return None if self.openai is None else self.openai.url

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def admin_headers(self) -> dict:
        """HTTP headers that open the restricted APIs."""
        return {} if self.admin_key is None else {ADMIN_HEADER: self.admin_key}

    @property
    def grpc_admin_headers(self) -> dict:
        """gRPC metadata (tritonclient ``headers=``) that opens the restricted protocols."""
        return {} if self.admin_key is None else {GRPC_ADMIN_HEADER: self.admin_key}

    def admin_request(self, method: str, path: str, body: dict | None = None, timeout_s: float = 120) -> dict:
        """An HTTP call to a restricted API with the key, e.g. ``("POST",
        "/v2/repository/models/llm/load")``; returns the JSON body (raises on HTTP errors)."""
        import json

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method=method,
                                     headers={**self.admin_headers, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw = r.read()
        return json.loads(raw) if raw.strip() else {}

    def reload_model(self, name: str, timeout_s: float = 300) -> None:
        """Reload ``name`` through model control (restarts its instances)."""
        self.admin_request("POST", f"/v2/repository/models/{name}/load", timeout_s=timeout_s)
        self.protect_regions()

    def protect_regions(self) -> None:
        """Make this server's Python backend regions (request and response tensors) mode 0600:
        the backend creates them 0644 whatever the umask. Call again after a model reload."""
        if self.region_token is None:
            return
        for name in server_regions(self.region_token):
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(REGION_DIR, name), 0o600)

    def is_ready(self) -> bool:
        return http_ok(f"http://{self.http_url}/v2/health/ready")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                reason = self._failure_reason()
                self.stop()
                raise ServerStartError(f"tritonserver exited with code {self.process.returncode}: {reason}")
            if self.is_ready():
                return
            time.sleep(0.5)
        reason = self._failure_reason()
        self.stop()
        raise ServerStartError(f"tritonserver not ready after {timeout_s}s (last error: {reason})")

    def _failure_reason(self) -> str:
        try:
            log = self.log()
        except OSError:
            return "see the server output above"
        return failure_reason(log) or "no reason in the server log; run with --verbose to see it"

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop within about ``exit_timeout_s`` (or ``timeout_s``) + 0.3 s: SIGINT starts
        tritonserver's graceful shutdown, which refuses new conversations, lets in-flight
        requests finish, and exits at once when nothing is open; but it counts every open
        conversation (a sequence-batcher slot) as in flight and would wait for it until its
        exit timeout. So after ``exit_timeout_s`` the launcher kills the server's process group
        (it started the server in a session of its own: exactly the server and its Python
        stubs; clients still connected get a dropped connection, not silence) and removes what
        they leave in /dev/shm: this server's Python backend regions and pools nobody holds."""
        if timeout_s is None:
            timeout_s = self.exit_timeout_s
        if self.openai is not None:
            self.openai.stop()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # tritonserver's graceful shutdown
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait()
        deadline = time.monotonic() + 10
        while live_group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # SIGKILL lands asynchronously; a pool is stale only once they are gone
        remove_stale_pools(self.pool_names)
        if self.region_token is not None:
            # a killed stub's other threads may still be closing its files: wait for the lock
            remove_regions(self.region_token, wait_s=5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        with open(os.path.join(self.workdir, "server.log"), errors="replace") as f:
            return f.read()


def launch(checkpoint: str | None = None, *, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
           instances: int = 1, host: str = "127.0.0.1", repository: str = DEFAULT_REPOSITORY,
           extra_params: dict | None = None, instance_kind: str | None = None,
           ready_timeout_s: float = 300, log_to_console: bool = False, exit_timeout_s: float = 1.5,
           restricted_apis: tuple[str, ...] | None = RESTRICTED_APIS, openai_port: int | None = None,
           model_name: str | None = None, openai_workers: int = 0) -> Server:
    """Start tritonserver on a copy of ``repository`` and wait until it is ready.

    ``restricted_apis``: Triton APIs (HTTP and gRPC) that need ``Server.admin_key``; None or
    () restricts nothing. ``exit_timeout_s``: how long a stop waits for in-flight requests.
    ``extra_params``: config.pbtxt parameters for every model; without ``pool_name`` the models
    get a pool private to this server. ``openai_port``: None runs no OpenAI frontend, 0 picks
    a free port; ``model_name``: the name it reports (default: the checkpoint directory's);
    ``openai_workers``: its processes (0: one on a CPU server, up to 4 on a GPU server, which
    streams more tokens than one frontend process can relay).
    Raises ``ServerStartError`` (the reason in one line) when the server does not come up."""
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
    remove_stale_regions()  # what crashed servers of this launcher left in /dev/shm
    remove_stale_pools(stale_private_pools())
    remove_stale_workdirs()
    token = secrets.token_hex(8)
    params = dict(extra_params or {})
    params.setdefault("pool_name", PRIVATE_POOL_PREFIX + token)
    # the lock before the work folder: a folder whose lock nobody holds belongs to nobody
    lock_fd = hold_region_lock(token) if os.path.isdir(REGION_DIR) else None
    workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{token}-")

    def abandon():  # a launch that fails before the server runs leaves nothing behind
        if lock_fd is not None:
            os.close(lock_fd)
            remove_regions(token)
        shutil.rmtree(workdir, ignore_errors=True)

    try:
        repo = write_repository(os.path.join(workdir, "model_repository"), repository, checkpoint,
                                instances, params, instance_kind)
        backends = prepare_backend_dir(os.path.join(workdir, "backends"))
    except BaseException:
        abandon()
        raise
    ports = [p or free_port() for p in (http_port, grpc_port, metrics_port)]
    cmd = [tritonserver_binary(),
           f"--model-repository={repo}", f"--backend-directory={backends}",
           f"--http-address={host}", f"--http-port={ports[0]}",
           f"--grpc-address={host}", f"--grpc-port={ports[1]}",
           f"--metrics-address={host}", f"--metrics-port={ports[2]}",
           "--allow-metrics=true", "--log-info=true", "--exit-on-error=true",
           f"--exit-timeout-secs={int(exit_timeout_s) + 2}",  # the launcher ends it first
           "--model-control-mode=explicit", "--load-model=*",
           f"--backend-config=python,shm-region-prefix-name={REGION_TAG}{token}-"]
    admin_key = None
    if restricted_apis:
        admin_key = secrets.token_hex(32)
        apis = ",".join(restricted_apis)
        cmd += [f"--http-restricted-api={apis}:{ADMIN_HEADER}={admin_key}",
                f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={admin_key}"]
    out = None if log_to_console else open(os.path.join(workdir, "server.log"), "w")
    try:
        proc = subprocess.Popen(cmd, env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, pass_fds=() if lock_fd is None else (lock_fd,),
                                umask=0o077)
    except BaseException:
        abandon()
        raise
    finally:
        if out is not None:
            out.close()
    if lock_fd is not None:
        os.close(lock_fd)  # the server's copy keeps the lock held
    server = Server(proc, host, *ports, workdir, repository_pool_names(repo), admin_key=admin_key,
                    region_token=token, exit_timeout_s=exit_timeout_s, model_name=model_name)
    server.wait_ready(ready_timeout_s)
    server.protect_regions()
    if openai_port is not None:
        if openai_workers <= 0:
            openai_workers = 1 if instance_kind == "KIND_CPU" else max(1, min(4, (os.cpu_count() or 1) // 4))
        start_openai(server, checkpoint, openai_port, model_name, log_to_console, openai_workers)
    return server


def start_openai(server: Server, checkpoint: str, port: int, model_name: str | None, log_to_console: bool,
                 workers: int = 1) -> None:
    """Start the OpenAI frontend of ``server`` (stopping the server if it cannot start)."""
    from tritonkv.openai_frontend.process import FrontendProcess
    from tritonkv.openai_frontend.served_model import default_model_name

    server.model_name = model_name or default_model_name(checkpoint)
    frontend = FrontendProcess(grpc_url=server.grpc_url, host=server.host, port=port or free_port(),
                               checkpoint=checkpoint, model_name=server.model_name, workers=workers,
                               log_path=None if log_to_console else os.path.join(server.workdir, "openai.log"))
    try:
        frontend.start()
    except (RuntimeError, TimeoutError) as exc:
        frontend.stop()
        server.stop()
        raise ServerStartError(str(exc)) from None
    server.openai = frontend


@contextlib.contextmanager
def start_server(checkpoint: str | None = None, **kwargs):
    """``with start_server() as server:`` a ready server on free loopback ports, stopped after."""
    server = launch(checkpoint, **kwargs)
    try:
        yield server
    finally:
        server.stop()
