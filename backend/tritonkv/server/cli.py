"""``tritonkv`` command line: ``tritonkv serve [CHECKPOINT_DIR] ...``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tritonkv", description="paged-KV LLM serving on Triton")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start tritonserver with the llm / llm_stateless models")
    serve.add_argument("checkpoint", nargs="?", default=None,
                       help="HF-format checkpoint directory (default: the generated demo model)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--instances", type=int, default=1, help="instances per model (instance_group count)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--verbose", action="store_true", help="server log on the console")
    args = parser.parse_args(argv)
    if args.command == "serve":
        from tritonkv.server.launcher import serve_forever

        return serve_forever(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
