"""``tritonkv serve``: launch the server, print where it listens, run until a signal."""

from __future__ import annotations

import signal
import sys
import time

from tritonkv.server.launcher import RESTRICTED_APIS, launch


def serve_forever(args) -> int:
    restricted = getattr(args, "restricted_api", ",".join(RESTRICTED_APIS))
    restricted = tuple(a for a in restricted.split(",") if a and a != "none")
    server = launch(args.checkpoint, http_port=args.http_port, grpc_port=args.grpc_port,
                    metrics_port=args.metrics_port, instances=args.instances, host=args.host,
                    log_to_console=args.verbose, restricted_apis=restricted,
                    extra_params=dict(p.split("=", 1) for p in getattr(args, "param", [])) or None,
                    exit_timeout_s=getattr(args, "exit_timeout", 1.5))
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
    if restricted:  # the key itself is never printed
        print(f"  restricted (launcher only): {', '.join(restricted)}")
    print(f"  try:    curl -s http://{server.http_url}/v2/models/llm_stateless/generate "
          "-d '{\"text_input\": \"Hello\", \"max_tokens\": 16}'")
    print(f"  chat:   tritonkv-chat --url {server.grpc_url}")
    sys.stdout.flush()
    while not stop["now"] and server.process.poll() is None:
        time.sleep(0.5)
    server.stop()
    return 0 if stop["now"] else (server.process.returncode or 1)
