"""``python -m tritonkv.openai_frontend --grpc-url HOST:PORT --port N --checkpoint DIR``: serve
the OpenAI API for one Triton server (the launcher starts this process and stops it).

``--workers N`` runs N processes on the port (uvicorn's workers): each is a gRPC client of
its own, so the frontend's per-token cost (about 0.1 ms of CPU, most of it receiving the gRPC
response) spreads over N cores when the server streams more tokens than one core handles.
With ``--parent-pid`` the frontend exits when that process is gone (a launcher killed hard
leaves no orphan frontend behind).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from tritonkv.openai_frontend.tool_parsers import PARSERS
from tritonkv.server.parent_watch import watch_parent

CONFIG_ENV = "TRITONKV_OPENAI_CONFIG"  # the settings every worker's app is built from (JSON)


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
    p.add_argument("--workers", type=int, default=1, help="processes serving the port (default: 1)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompts whose text cannot fit this many tokens are refused before templating "
                        "(default: the checkpoint's max_position_embeddings)")
    p.add_argument("--cache-salt-per-api-key", action="store_true",
                   help="give every API key (Authorization: Bearer KEY) a prefix-cache namespace of its own")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="how tool calls are read from the model's text for tool_choice 'auto' (default: by the "
                        "checkpoint's model_type: llama -> llama3_json, qwen2 / qwen3 -> hermes)")
    return p.parse_args(argv)


def app_from_env():
    """The app of one worker (uvicorn factory), from the settings in $TRITONKV_OPENAI_CONFIG."""
    from tritonkv.openai_frontend.app import create_app
    from tritonkv.openai_frontend.served_model import ServedModel
    from tritonkv.openai_frontend.triton_bridge import TritonBridge

    cfg = json.loads(os.environ[CONFIG_ENV])
    model = ServedModel.load(cfg["checkpoint"], cfg["model_name"], cfg.get("max_model_len"),
                             cfg.get("tool_call_parser"))
    return create_app(model, TritonBridge(cfg["grpc_url"], cfg["triton_model"]),
                      salt_per_api_key=cfg.get("salt_per_api_key", False))


def main(argv=None) -> int:
    import uvicorn

    from tritonkv.openai_frontend.served_model import ServedModel

    args = parse_args(argv)
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    # fails here, once, if bad
    model = ServedModel.load(args.checkpoint, args.model_name, args.max_model_len, args.tool_call_parser)
    os.environ[CONFIG_ENV] = json.dumps({"checkpoint": args.checkpoint, "model_name": model.name,
                                         "grpc_url": args.grpc_url, "triton_model": args.triton_model,
                                         "max_model_len": args.max_model_len, "tool_call_parser": args.tool_call_parser,
                                         "salt_per_api_key": args.cache_salt_per_api_key})
    if args.parent_pid:
        # SIGTERM: uvicorn stops gracefully
        watch_parent(args.parent_pid, lambda: os.kill(os.getpid(), signal.SIGTERM))
    print(f"tritonkv OpenAI frontend: model {model.name!r} on http://{args.host}:{args.port}/v1 "
          f"-> Triton {args.grpc_url} ({args.triton_model}), {args.workers} worker(s)"
          + ("" if model.template else "; no chat template: /v1/chat/completions is refused"), flush=True)
    uvicorn.run("tritonkv.openai_frontend.__main__:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                loop="auto", http="auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
