"""``tritonkv serve``: launch the server, print where it listens, supervise it until a signal.

Rules (docs/operations.md):
- every port (``--http-port``, ``--grpc-port``, ``--metrics-port``, ``--openai-port``,
  ``--health-port``) is checked before anything starts: a port in use ends serve at once
  (exit 1) with the flag named;
- SIGINT, SIGTERM, SIGHUP (the terminal closed) and the death of serve's parent (it asks
  the kernel for SIGTERM then) all stop the whole tree: the OpenAI frontend and tritonserver
  at once, each process group killed after ``--exit-timeout``; a signal during a (re)start
  cancels it. Nothing is left: processes, ports, /dev/shm regions, work folders;
- progress lines while loading and while stopping;
- the supervisor (``server/supervisor.py``) restarts tritonserver when an instance dies,
  fails or stops stepping, and serves ``/health/live`` and ``/health/ready`` on
  ``--health-port``; three failed launches in a row end serve with exit 1.
  ``--no-supervisor`` runs the server alone (serve then exits when tritonserver does).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from tritonkv.server.errors import ServerStartError
from tritonkv.server.launcher import RESTRICTED_APIS, launch
from tritonkv.server.ports import check_ports_free
from tritonkv.server.process_tree import set_parent_death_signal
from tritonkv.server.stop_signals import StopSignals

DEFAULT_HEALTH_PORT = 8003
DEFAULT_STUCK_AFTER_S = 60.0


def say(message: str) -> None:
    print(message, flush=True)


def resolve_ports(args, supervised: bool) -> dict[str, int]:
    """Every port serve will listen on, checked free (0: a free one), by flag."""
    wanted = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    if getattr(args, "openai_port", None) is not None:
        wanted["--openai-port"] = args.openai_port
    if supervised:
        wanted["--health-port"] = getattr(args, "health_port", DEFAULT_HEALTH_PORT)
    return check_ports_free(args.host, wanted)


def serve_forever(args) -> int:
    supervised = not getattr(args, "no_supervisor", False)
    ports = resolve_ports(args, supervised)  # before anything else: a busy port ends serve at once
    stopping = threading.Event()
    signals = StopSignals(stopping)
    parent = os.getppid()
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        return 0

    restricted = getattr(args, "restricted_api", ",".join(RESTRICTED_APIS))
    restricted = tuple(a for a in restricted.split(",") if a and a != "none")
    settings = dict(instances=args.instances, host=args.host, log_to_console=args.verbose,
                    restricted_apis=restricted, admin_key=getattr(args, "admin_key", False),
                    extra_params=dict(p.split("=", 1) for p in getattr(args, "param", [])) or None,
                    exit_timeout_s=getattr(args, "exit_timeout", 1.5),
                    model_name=getattr(args, "model_name", None), openai_workers=getattr(args, "openai_workers", 0),
                    tool_call_parser=getattr(args, "tool_call_parser", None),
                    stateless_model=getattr(args, "stateless_model_name", "llm_stateless"),
                    progress=say, cancel=stopping)
    say(f"tritonkv: starting tritonserver (checkpoint {args.checkpoint or 'demo'}); models load first")
    try:
        server = launch(args.checkpoint, http_port=ports["--http-port"], grpc_port=ports["--grpc-port"],
                        metrics_port=ports["--metrics-port"], openai_port=ports.get("--openai-port"), **settings)
    except ServerStartError:
        if stopping.is_set():
            say(f"tritonkv: stopped ({signals.received or 'signal'} during the start)")
            return 0
        raise
    supervisor = health = None
    if supervised:
        from tritonkv.server.health_endpoint import HealthEndpoint
        from tritonkv.server.supervisor import Supervisor, relauncher

        supervisor = Supervisor(server, relauncher(args.checkpoint, **settings),
                                stuck_after_s=getattr(args, "stuck_after", DEFAULT_STUCK_AFTER_S), log=say)
        try:
            health = HealthEndpoint(supervisor, args.host, ports["--health-port"])
        except OSError as exc:
            server.stop()
            raise ServerStartError(f"--health-port {ports['--health-port']}: the health endpoint cannot listen "
                                   f"on {args.host}: {exc}") from None
        supervisor.start()
    banner(server, health, restricted)
    while not stopping.wait(0.5):
        if supervisor is None and server.process.poll() is not None:
            break
        if supervisor is not None and supervisor.gave_up:
            break
    t0 = time.monotonic()
    if stopping.is_set():
        say(f"tritonkv: stopping ({signals.received or 'signal'}): OpenAI frontend and tritonserver, "
            f"in-flight requests get {server.exit_timeout_s:g} s")
    if supervisor is not None:  # no more checks or restarts; a restart in progress is cancelled
        supervisor.request_stop()
        health.close()
    server = supervisor.server if supervisor is not None else server
    server.stop()  # the OpenAI frontend and tritonserver at once
    if supervisor is not None:
        supervisor.stop()
        if supervisor.server is not server:  # a restart finished meanwhile
            supervisor.server.stop()
    say(f"tritonkv: stopped in {time.monotonic() - t0:.1f} s")
    if stopping.is_set():
        return 0
    return 1 if supervisor is not None else (server.process.returncode or 1)


def banner(server, health, restricted) -> None:
    say(f"tritonkv ready (models llm, {server.stateless_model}; checkpoint {server.checkpoint})")
    say(f"  HTTP    http://{server.http_url}")
    say(f"  gRPC    {server.grpc_url}")
    say(f"  metrics {server.metrics_url}")
    if server.openai_url:
        say(f"  OpenAI  {server.openai_url}  (model {server.model_name})")
        say(f"  tokenizer {server.checkpoint}  (aiperf --tokenizer; no hub access needed)")
    if health is not None:
        say(f"  health  http://{server.host}:{health.port}/health/live, /health/ready (supervised)")
    say(f"  log     {server.workdir}/server.log")
    if restricted:  # the key itself is never printed
        who = f"callers with the key in {server.workdir}/admin-key" if server.admin_key else "nobody"
        say(f"  restricted ({who}): {', '.join(restricted)}")
    say(f"  try:    curl -s http://{server.http_url}/v2/models/{server.stateless_model}/generate "
        "-d '{\"text_input\": \"Hello\", \"max_tokens\": 16}'")
    say(f"  chat:   tritonkv-chat --url {server.grpc_url}")
    sys.stdout.flush()
