"""``tritonkv`` command line: ``tritonkv serve [CHECKPOINT_DIR] ...``, ``tritonkv capacity ...``."""

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
    serve.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="model parameter for both models, e.g. pool_name=mine or kv_cache_memory_mb=1024 "
                            "(config.pbtxt parameters; repeatable)")
    serve.add_argument("--restricted-api", default="shared-memory,model-repository,logging,trace",
                       help="Triton APIs (HTTP and gRPC) only the launcher may call, comma-separated, "
                            "or 'none' (default: %(default)s; see docs/security.md)")
    serve.add_argument("--exit-timeout", type=float, default=1.5,
                       help="seconds a stop lets in-flight requests finish before the server is ended "
                            "(default: %(default)s)")
    capacity = sub.add_parser("capacity", help="KV bytes per token and how many sequences fit in a memory budget")
    capacity.add_argument("checkpoint", nargs="?", default=None,
                          help="HF-format checkpoint directory (default: the generated demo model)")
    capacity.add_argument("--memory-gb", type=float, default=None,
                          help="KV memory budget in GB (default: the engine's kv_cache_memory_mb)")
    capacity.add_argument("--context", type=int, default=None,
                          help="tokens per sequence (default: the model's max_position_embeddings)")
    capacity.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                          help="engine parameter as in config.pbtxt, e.g. block_size=16 or kv_window=4096 "
                               "(repeatable)")
    args = parser.parse_args(argv)
    if args.command == "capacity":
        bad = [p for p in args.param if "=" not in p]
        if bad:
            parser.error(f"--param takes KEY=VALUE, got {bad[0]!r}")
        from tritonkv.cache.capacity_report import run

        return run(args)
    if args.command == "serve":
        bad = [p for p in args.param if "=" not in p]
        if bad:
            parser.error(f"--param takes KEY=VALUE, got {bad[0]!r}")
        from tritonkv.server.serve import serve_forever

        return serve_forever(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
