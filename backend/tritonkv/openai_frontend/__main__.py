"""``python -m tritonkv.openai_frontend --grpc-url HOST:PORT --port N --checkpoint DIR``: serve
the OpenAI API for one Triton server (the launcher starts this process and stops it).

With ``--parent-pid`` the process exits when that process is gone (a launcher killed hard
leaves no orphan frontend behind).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tritonkv.openai_frontend",
                                description="OpenAI-compatible endpoints for a tritonkv Triton server")
    p.add_argument("--grpc-url", required=True, help="Triton gRPC address, HOST:PORT")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--checkpoint", required=True, help="the served checkpoint (tokenizer, chat template)")
    p.add_argument("--model-name", default=None, help="the model name the API reports (default: the "
                                                       "checkpoint directory's name, tritonkv-demo for the demo)")
    p.add_argument("--triton-model", default="llm_stateless", help="the Triton model requests go to")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    return p.parse_args(argv)


async def _watch_parent(pid: int, server) -> None:
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != pid:
            server.should_exit = True
            return


def main(argv=None) -> int:
    import uvicorn

    from tritonkv.openai_frontend.app import create_app
    from tritonkv.openai_frontend.served_model import ServedModel
    from tritonkv.openai_frontend.triton_bridge import TritonBridge

    args = parse_args(argv)
    model = ServedModel.load(args.checkpoint, args.model_name)
    app = create_app(model, TritonBridge(args.grpc_url, args.triton_model))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2, loop="auto", http="auto")
    server = uvicorn.Server(config)

    async def run():
        watcher = asyncio.ensure_future(_watch_parent(args.parent_pid, server)) if args.parent_pid else None
        try:
            await server.serve()
        finally:
            if watcher is not None:
                watcher.cancel()

    print(f"tritonkv OpenAI frontend: model {model.name!r} on http://{args.host}:{args.port}/v1 "
          f"-> Triton {args.grpc_url} ({args.triton_model})"
          + ("" if model.template else "; no chat template: /v1/chat/completions is refused"), flush=True)
    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
