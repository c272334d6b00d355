"""``tritonkv serve``: launch the server, print where it listens, supervise it until a signal.

The supervisor (``server/supervisor.py``) restarts tritonserver or reloads a model when an
instance dies, fails or stops stepping, and serves ``/health/live`` and ``/health/ready`` on
``--health-port`` for Kubernetes probes (docs/operations.md). ``--no-supervisor`` runs the
server alone (it then exits when tritonserver does).
"""

from __future__ import annotations

import signal
import sys
import time

from tritonkv.server.launcher import RESTRICTED_APIS, ServerStartError, launch

DEFAULT_HEALTH_PORT = 8003
DEFAULT_STUCK_AFTER_S = 60.0


def serve_forever(args) -> int:
    restricted = getattr(args, "restricted_api", ",".join(RESTRICTED_APIS))
    restricted = tuple(a for a in restricted.split(",") if a and a != "none")
    settings = dict(instances=args.instances, host=args.host, log_to_console=args.verbose,
                    restricted_apis=restricted,
                    extra_params=dict(p.split("=", 1) for p in getattr(args, "param", [])) or None,
                    exit_timeout_s=getattr(args, "exit_timeout", 1.5),
                    model_name=getattr(args, "model_name", None), openai_workers=getattr(args, "openai_workers", 0))
    supervised = not getattr(args, "no_supervisor", False)
    health_port = getattr(args, "health_port", DEFAULT_HEALTH_PORT)
    if supervised:
        from tritonkv.server.health_endpoint import HealthEndpoint
        from tritonkv.server.supervisor import Supervisor, relauncher, wait_ports_free

        if health_port and not wait_ports_free(args.host, [health_port], timeout_s=0):
            raise ServerStartError(f"the health endpoint cannot listen on {args.host}:{health_port}: "
                                   "the port is in use (--health-port)")
    server = launch(args.checkpoint, http_port=args.http_port, grpc_port=args.grpc_port,
                    metrics_port=args.metrics_port, openai_port=getattr(args, "openai_port", None), **settings)
    supervisor = health = None
    if supervised:
        supervisor = Supervisor(server, relauncher(args.checkpoint, **settings),
                                stuck_after_s=getattr(args, "stuck_after", DEFAULT_STUCK_AFTER_S),
                                log=lambda message: print(message, flush=True))
        try:
            health = HealthEndpoint(supervisor, args.host, health_port)
        except OSError as exc:
            server.stop()
            raise ServerStartError(f"the health endpoint cannot listen on {args.host}:{health_port}: {exc}") from None
        supervisor.start()
    stop = {"now": False}

    def on_signal(signum, _frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"tritonkv ready (models llm, llm_stateless; checkpoint {args.checkpoint or 'demo'})")
    print(f"  HTTP    http://{server.http_url}")
    print(f"  gRPC    {server.grpc_url}")
    print(f"  metrics {server.metrics_url}")
    if server.openai_url:
        print(f"  OpenAI  {server.openai_url}  (model {server.model_name})")
    if health is not None:
        print(f"  health  http://{args.host}:{health.port}/health/live, /health/ready (supervised)")
    print(f"  log     {server.workdir}/server.log")
    if restricted:  # the key itself is never printed
        print(f"  restricted (launcher only): {', '.join(restricted)}")
    print(f"  try:    curl -s http://{server.http_url}/v2/models/llm_stateless/generate "
          "-d '{\"text_input\": \"Hello\", \"max_tokens\": 16}'")
    print(f"  chat:   tritonkv-chat --url {server.grpc_url}")
    sys.stdout.flush()
    while not stop["now"]:
        if supervisor is None and server.process.poll() is not None:
            break
        if supervisor is not None and supervisor.gave_up:
            break
        time.sleep(0.5)
    if supervisor is not None:
        supervisor.stop()  # waits for a restart in progress
        server = supervisor.server
        health.close()
    server.stop()
    if stop["now"]:
        return 0
    return 1 if supervisor is not None else (server.process.returncode or 1)
