"""Start a real tritonserver (the one shipped in the nvidia-pytriton wheel, or $TRITONSERVER)
on a copy of the model repository, wait until it is ready, stop it.

Rules:
- every port is checked free before anything starts (``ports.check_ports_free``): a port in
  use fails at once naming its flag; 0 picks a free port;
- ready means: tritonserver's ``/v2/health/ready`` is 200 *and* the sockets listening on
  the HTTP and gRPC ports belong to this launch's own processes (not whatever answers there);
  with an OpenAI frontend, its ``/health`` is 200 from its own listener too; no process of
  the tree is stopped (SIGSTOP);
- listeners bind to loopback unless told otherwise;
- the models run in the tritonkv backend (``install_backend.py``) installed into the
  server's work folder, the repository is written there (``repository.py``);
- children run in sessions of their own, umask 077, and die with the launcher
  (``process_tree.py``);
- a stop ends the OpenAI frontend and tritonserver at the same time: SIGTERM / SIGINT, then
  after ``exit_timeout_s`` a SIGKILL of each process group; then the server's Python backend
  regions and its work folder are removed (``shm_regions.py``) and the engine cores of its
  private pool stopped and waited for (``private_core.py``). The next launch removes what a
  crashed server of this launcher left (regions, work folders).

Security defaults (docs/security.md): Triton's shared-memory, model-repository, logging and
trace APIs are restricted on HTTP and gRPC. tritonserver 2.51 reads the key only from its
command line, where any local user can read it (``/proc/<pid>/cmdline``); so by default the
key holds a newline, which no HTTP request and no gRPC metadata can carry: the APIs are
closed to everyone, the launcher included (``Server.admin_key`` None). ``admin_key=True``
makes a usable key instead (kept on ``Server``, written to ``<workdir>/admin-key`` 0600) for
deployments where /proc is private (a container of its own, ``hidepid=2``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from tritonkv.server import shm_regions
from tritonkv.server.errors import ServerStartError
from tritonkv.server.install_backend import install_backend
from tritonkv.server.ports import check_ports_free, free_port, owns_listener
from tritonkv.server.private_core import end_pool_cores
from tritonkv.server.private_shm import command_prefix as private_shm_prefix
from tritonkv.server.private_shm import shm_view
from tritonkv.server.probes import failure_reason, http_ok, progress_lines
from tritonkv.server.process_tree import end_group, live_group_members, spawn, stopped_members, tree_members
from tritonkv.server.repository import STATELESS_MODEL, check_model_name, write_repository
from tritonkv.server.shm_regions import REGION_DIR, REGION_TAG, WORKDIR_PREFIX, server_regions
from tritonkv.server.tritonserver_env import server_env, tritonserver_binary

__all__ = ["ServerStartError", "Server", "launch", "start_server", "free_port", "live_group_members",
           "failure_reason", "http_ok", "REGION_DIR", "REGION_TAG", "server_regions", "RESTRICTED_APIS",
           "DEFAULT_REPOSITORY", "DEFAULT_OPENAI_PORT", "ADMIN_HEADER"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_REPOSITORY = os.path.join(ROOT, "model_repository")
DEFAULT_OPENAI_PORT = 9000

# Triton APIs no client may call: they can read or write server memory (shared memory), load
# and unload models, and change logging / tracing
RESTRICTED_APIS = ("shared-memory", "model-repository", "logging", "trace")
ADMIN_HEADER = "tritonkv-admin-key"  # HTTP header; gRPC metadata is "triton-grpc-protocol-" + this
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
# the models of one server share a KV pool named "server-<token>" unless a pool_name is given
PRIVATE_POOL_PREFIX = "server-"
PROGRESS_EVERY_S = 10.0


def unsendable_key() -> str:
    """A restricted-API key no HTTP header and no gRPC metadata can carry (a newline: evhtp
    drops the connection, gRPC refuses the metadata): the APIs stay closed to everyone."""
    return secrets.token_hex(16) + "\n"


@dataclass
class Server:
    process: object  # subprocess.Popen of tritonserver
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    workdir: str
    # the key that opens the restricted APIs (None: closed to everyone); never print it
    admin_key: str | None = field(default=None, repr=False)
    region_token: str | None = None  # its Python backend regions: REGION_TAG + token + "-<uuid>"
    exit_timeout_s: float = 1.5  # how long a stop lets in-flight requests finish
    openai: object | None = None  # its OpenAI frontend (openai_frontend.process.FrontendProcess)
    model_name: str | None = None  # the model name the OpenAI API reports
    stateless_model: str = STATELESS_MODEL  # the Triton name of the one-shot model
    checkpoint: str | None = None  # the served checkpoint (its tokenizer: aiperf --tokenizer)
    private_shm: bool = False  # tritonserver has a /dev/shm of its own (private_shm.py)
    private_pool: str | None = None  # its models' own KV pool: its cores end with a stop

    @property
    def shm_dir(self) -> str:
        """The /dev/shm tritonserver's processes see (its own, seen through /proc, if private)."""
        return shm_view(self.process.pid) if self.private_shm else REGION_DIR

    def regions(self) -> list[str]:
        """This server's Python backend regions (names in ``shm_dir``)."""
        with contextlib.suppress(OSError):
            return sorted(n for n in os.listdir(self.shm_dir) if n.startswith(shm_regions.region_prefix(
                self.region_token or "")))
        return []

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
        """HTTP headers that open the restricted APIs (``admin_key=True`` launches only)."""
        return {} if self.admin_key is None else {ADMIN_HEADER: self.admin_key}

    @property
    def grpc_admin_headers(self) -> dict:
        """gRPC metadata (tritonclient ``headers=``) that opens the restricted protocols."""
        return {} if self.admin_key is None else {GRPC_ADMIN_HEADER: self.admin_key}

    def admin_request(self, method: str, path: str, body: dict | None = None, timeout_s: float = 120) -> dict:
        """An HTTP call to a restricted API with the key, e.g. ``("POST",
        "/v2/repository/models/llm/load")``; returns the JSON body (raises on HTTP errors)."""
        import json

        if self.admin_key is None:
            raise PermissionError("the restricted APIs are closed on this server (launch with admin_key=True)")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method=method,
                                     headers={**self.admin_headers, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw = r.read()
        return json.loads(raw) if raw.strip() else {}

    def reload_model(self, name: str, timeout_s: float = 300) -> None:
        """Reload ``name`` through model control (restarts its instances; needs the key)."""
        self.admin_request("POST", f"/v2/repository/models/{name}/load", timeout_s=timeout_s)
        self.protect_regions()

    def protect_regions(self) -> None:
        """Make this server's Python backend regions mode 0600 (the backend creates them 0644
        whatever the umask) where they are in the host's /dev/shm. Call again after a reload."""
        if self.region_token is not None and not self.private_shm:
            shm_regions.protect_regions(self.region_token)

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): every endpoint this launch exposes answers from its own process."""
        members = tree_members(self.process.pid)
        stopped = stopped_members(self.process.pid, members)
        if stopped:
            return False, f"process {stopped[0]} of tritonserver is stopped (SIGSTOP)"
        if not http_ok(f"http://{self.http_url}/v2/health/ready", timeout_s=1):
            return False, "tritonserver is not ready"
        for port, what in ((self.http_port, "HTTP"), (self.grpc_port, "gRPC")):
            if not owns_listener(self.process.pid, port, members):
                return False, f"the {what} port {port} is not this tritonserver's"
        if self.openai is not None:
            ok, why = self.openai.readiness()
            if not ok:
                return False, why
        return True, ""

    def is_ready(self) -> bool:
        return self.readiness()[0]

    def wait_ready(self, timeout_s: float, progress: Callable[[str], None] | None = None,
                   cancel: threading.Event | None = None) -> None:
        """Wait until ready; on a failure, a timeout or ``cancel``, stop and raise ServerStartError."""
        start = time.monotonic()
        deadline, next_note, seen = start + timeout_s, start + PROGRESS_EVERY_S, 0
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                self.stop()
                raise ServerStartError("the start was cancelled (a stop signal)")
            if self.process.poll() is not None:
                reason = self._failure_reason()
                self.stop()
                raise ServerStartError(f"tritonserver exited with code {self.process.returncode}: {reason}")
            ready, why = self.readiness()
            if progress is not None:
                with contextlib.suppress(OSError):
                    lines = progress_lines(self.log())
                    for line in lines[seen:]:
                        progress(f"tritonkv: {line} ({time.monotonic() - start:.0f} s)")
                    seen = len(lines)
            if ready:
                return
            if progress is not None:
                if time.monotonic() >= next_note:
                    progress(f"tritonkv: starting tritonserver ({time.monotonic() - start:.0f} s; {why})")
                    next_note += PROGRESS_EVERY_S
            if cancel is not None:
                cancel.wait(0.2)
            else:
                time.sleep(0.2)
        _, why = self.readiness()
        reason = self._failure_reason()
        self.stop()
        raise ServerStartError(f"tritonserver not ready after {timeout_s}s ({why}; last error: {reason})")

    def _failure_reason(self) -> str:
        try:
            log = self.log()
        except OSError:
            return "see the server output above"
        return failure_reason(log) or "no reason in the server log; run with --verbose to see it"

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop within about ``exit_timeout_s`` (or ``timeout_s``) + 0.3 s. SIGINT starts
        tritonserver's graceful shutdown (new conversations refused, in-flight requests may
        finish), SIGTERM the OpenAI frontend's, both at once; but tritonserver counts every
        open conversation (a sequence-batcher slot) as in flight and would wait for it, so at
        the deadline each process group is killed (clients still connected get a dropped
        connection, not silence), this server's regions and work folder are removed and the
        cores of its private pool stopped (at most 5 s more)."""
        deadline = time.monotonic() + (self.exit_timeout_s if timeout_s is None else timeout_s)
        if self.openai is not None:
            self.openai.begin_stop()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # tritonserver's graceful shutdown
        end_group(self.process, deadline)
        if self.openai is not None:
            self.openai.finish_stop(deadline)
        if self.private_pool is not None:
            end_pool_cores(self.private_pool)  # else they would outlive the stop by their grace period
        if self.region_token is not None:
            # a killed stub's other threads may still be closing its files: wait for the lock
            shm_regions.remove_regions(self.region_token, wait_s=5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        with open(os.path.join(self.workdir, "server.log"), errors="replace") as f:
            return f.read()


def default_instance_kind() -> str:
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            return "KIND_GPU"
    return "KIND_CPU"


def launch(checkpoint: str | None = None, *, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
           instances: int = 1, host: str = "127.0.0.1", repository: str = DEFAULT_REPOSITORY,
           extra_params: dict | None = None, instance_kind: str | None = None,
           ready_timeout_s: float = 300, log_to_console: bool = False, exit_timeout_s: float = 1.5,
           restricted_apis: tuple[str, ...] | None = RESTRICTED_APIS, admin_key: bool = False,
           openai_port: int | None = None, model_name: str | None = None, openai_workers: int = 0,
           stateless_model: str = STATELESS_MODEL, progress: Callable[[str], None] | None = None,
           cancel: threading.Event | None = None, private_shm: bool = True,
           tool_call_parser: str | None = None) -> Server:
    """Start tritonserver on a copy of ``repository`` and wait until it is ready.

    ``restricted_apis``: Triton APIs (HTTP and gRPC) closed to clients; None or () restricts
    nothing. ``admin_key``: False closes them to everyone, True opens them to callers with
    ``Server.admin_key`` (on tritonserver's command line: see the module docstring).
    ``exit_timeout_s``: how long a stop waits for in-flight requests. ``extra_params``:
    config.pbtxt parameters for every model; without ``pool_name`` the models get a pool
    private to this server. ``openai_port``: None runs no OpenAI frontend, 0 picks a free
    port; ``model_name``: the name it reports (default: the checkpoint directory's);
    ``openai_workers``: its processes (0: one on a CPU server, up to 4 on a GPU server);
    ``tool_call_parser``: its ``--tool-call-parser`` (None: the model family's).
    ``stateless_model``: the Triton name of the one-shot model. ``progress``: called with a
    line while models load; ``cancel`` set (a signal) stops the start. ``private_shm``: run
    tritonserver with a /dev/shm of its own where the system allows it (``private_shm.py``).
    Raises ``ServerStartError`` (the reason in one line)."""
    from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

    stateless_model = check_model_name(stateless_model)
    wanted = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
    if openai_port is not None:
        wanted["--openai-port"] = openai_port
    ports = check_ports_free(host, wanted)
    if checkpoint is None:
        checkpoint = ensure_demo_checkpoint()  # once, before instances race for it
    checkpoint = os.path.abspath(checkpoint)
    instance_kind = instance_kind or default_instance_kind()
    shm_regions.remove_stale_regions()  # what crashed servers of this launcher left
    shm_regions.remove_stale_workdirs()
    token = secrets.token_hex(8)
    params = dict(extra_params or {})
    private_pool = None if "pool_name" in params else PRIVATE_POOL_PREFIX + token
    params.setdefault("pool_name", private_pool)
    # the lock before the work folder: a folder whose lock nobody holds belongs to nobody
    lock_fd = shm_regions.hold_region_lock(token) if os.path.isdir(REGION_DIR) else None
    workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{token}-")

    def abandon():  # a launch that fails before the server runs leaves nothing behind
        if lock_fd is not None:
            os.close(lock_fd)
            shm_regions.remove_regions(token)
        shutil.rmtree(workdir, ignore_errors=True)

    try:
        repo = write_repository(os.path.join(workdir, "model_repository"), repository, checkpoint,
                                instances, params, instance_kind, stateless_model)
        backends = os.environ.get("TRITON_BACKENDS") or install_backend(os.path.join(workdir, "backends"))
        key = secrets.token_hex(32) if admin_key else unsendable_key()
        cmd = tritonserver_command(repo, backends, host, ports, exit_timeout_s, token, restricted_apis, key)
        prefix = private_shm_prefix() if private_shm else None
        cmd = list(prefix or ()) + cmd
        if admin_key and restricted_apis:
            with open(os.open(os.path.join(workdir, "admin-key"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                      "w") as f:
                f.write(key + "\n")
        out = None if log_to_console else open(os.path.join(workdir, "server.log"), "w")
        try:
            proc = spawn(cmd, env=server_env(), stdout=out, pass_fds=() if lock_fd is None else (lock_fd,))
        finally:
            if out is not None:
                out.close()
    except BaseException:
        abandon()
        raise
    if lock_fd is not None:
        os.close(lock_fd)  # the server's copy keeps the lock held
    server = Server(proc, host, ports["--http-port"], ports["--grpc-port"], ports["--metrics-port"], workdir,
                    admin_key=key if admin_key and restricted_apis else None, region_token=token,
                    exit_timeout_s=exit_timeout_s, model_name=model_name, stateless_model=stateless_model,
                    checkpoint=checkpoint, private_shm=prefix is not None, private_pool=private_pool)
    server.wait_ready(ready_timeout_s, progress, cancel)
    server.protect_regions()
    if openai_port is not None:
        if openai_workers <= 0:
            openai_workers = 1 if instance_kind == "KIND_CPU" else max(1, min(4, (os.cpu_count() or 1) // 4))
        start_openai(server, checkpoint, ports["--openai-port"], model_name, log_to_console, openai_workers,
                     tool_call_parser)
    return server


def tritonserver_command(repo: str, backends: str, host: str, ports: dict, exit_timeout_s: float, token: str,
                         restricted_apis, key: str) -> list[str]:
    cmd = [tritonserver_binary(),
           f"--model-repository={repo}", f"--backend-directory={backends}",
           f"--http-address={host}", f"--http-port={ports['--http-port']}",
           f"--grpc-address={host}", f"--grpc-port={ports['--grpc-port']}",
           f"--metrics-address={host}", f"--metrics-port={ports['--metrics-port']}",
           "--allow-metrics=true", "--log-info=true", "--exit-on-error=true",
           f"--exit-timeout-secs={int(exit_timeout_s) + 2}",  # the launcher ends it first
           "--model-control-mode=explicit", "--load-model=*",
           f"--backend-config=python,shm-region-prefix-name={shm_regions.region_prefix(token)}"]
    if restricted_apis:
        apis = ",".join(restricted_apis)
        cmd += [f"--http-restricted-api={apis}:{ADMIN_HEADER}={key}",
                f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={key}"]
    return cmd


def start_openai(server: Server, checkpoint: str, port: int, model_name: str | None, log_to_console: bool,
                 workers: int = 1, tool_call_parser: str | None = None) -> None:
    """Start the OpenAI frontend of ``server`` (stopping the server if it cannot start)."""
    from tritonkv.openai_frontend.process import FrontendProcess
    from tritonkv.openai_frontend.served_model import default_model_name

    server.model_name = model_name or default_model_name(checkpoint)
    frontend = FrontendProcess(grpc_url=server.grpc_url, host=server.host, port=port,
                               checkpoint=checkpoint, model_name=server.model_name, workers=workers,
                               triton_model=server.stateless_model, tool_call_parser=tool_call_parser,
                               log_path=None if log_to_console else os.path.join(server.workdir, "openai.log"))
    try:
        frontend.start()
    except (RuntimeError, TimeoutError) as exc:
        frontend.begin_stop()
        frontend.finish_stop(time.monotonic() + 1)
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
