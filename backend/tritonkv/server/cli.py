"""``tritonkv`` command line: ``tritonkv serve [CHECKPOINT_DIR] ...``, ``tritonkv capacity ...``.

``serve`` has a flag for every ``EngineConfig`` field (``--kv-cache-memory-mb 1024``,
``--enable-prefix-caching / --no-enable-prefix-caching``, ...), generated from the dataclass
with the comment beside (or above) each field as its help, so a field added there is a flag
here. A flag given becomes the config.pbtxt parameter of both models; a flag not given
leaves the repository's value. ``--param KEY=VALUE`` sets any parameter too (not the same key
as a flag).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys

from tritonkv.config import EngineConfig
from tritonkv.server.launcher import DEFAULT_OPENAI_PORT

POSITIONAL_FIELDS = ("checkpoint",)  # given as serve's positional argument
SERVE_DEFAULT_NOTES = {
    "pool_name": "tritonkv serve default: a pool private to this server (server-<token>); give two servers "
                 "the same name to share their KV on purpose",
}


def field_comments(cls) -> dict[str, str]:
    """Each dataclass field's comment: the one at the end of its line, else the comment lines
    right above it."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.lineno - 1]
            tokens = line.split("#", 1)
            text = tokens[1].strip() if len(tokens) == 2 and tokens[0].count('"') % 2 == 0 else ""
            if not text:
                above, i = [], node.lineno - 2
                while i >= 0 and lines[i].strip().startswith("#"):
                    above.insert(0, lines[i].strip()[1:].strip())
                    i -= 1
                text = " ".join(above)
            comments[node.target.id] = text
    return comments


def add_engine_flags(parser: argparse.ArgumentParser) -> list[str]:
    """One flag per EngineConfig field (default None: not given). Returns the field names."""
    group = parser.add_argument_group("engine settings (EngineConfig; default: the model repository's value)")
    comments = field_comments(EngineConfig)
    names = []
    for f in dataclasses.fields(EngineConfig):
        if f.name in POSITIONAL_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = comments.get(f.name, "")
        help_text = f"{text} (EngineConfig default: {default!r})" if text else f"(EngineConfig default: {default!r})"
        if f.name in SERVE_DEFAULT_NOTES:
            help_text += "; " + SERVE_DEFAULT_NOTES[f.name]
        help_text = help_text.replace("%", "%%")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind == "bool":
            group.add_argument(flag, dest=f"engine_{f.name}", action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            convert = {"int": int, "float": float}.get(kind, str)
            group.add_argument(flag, dest=f"engine_{f.name}", type=convert, default=None,
                               metavar=kind.upper() if kind in ("int", "float") else "VALUE", help=help_text)
        names.append(f.name)
    return names


def engine_params(args, names: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``--param`` pairs and the engine flags given, as config.pbtxt string parameters."""
    bad = [p for p in args.param if "=" not in p]
    if bad:
        parser.error(f"--param takes KEY=VALUE, got {bad[0]!r}")
    params = dict(p.split("=", 1) for p in args.param)
    for name in names:
        value = getattr(args, f"engine_{name}")
        if value is None:
            continue
        if name in params:
            parser.error(f"{name} given twice (--{name.replace('_', '-')} and --param {name}=...)")
        params[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tritonkv", description="paged-KV LLM serving on Triton")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start tritonserver with the llm / llm_stateless models")
    serve.add_argument("checkpoint", nargs="?", default=None,
                       help="HF checkpoint directory, or an ONNX export (directory or .onnx file, docs/onnx.md); "
                            "default: the generated demo model")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--openai-port", type=int, default=DEFAULT_OPENAI_PORT,
                       help="port of the OpenAI-compatible API (/v1/...; 0: a free port; default: %(default)s)")
    serve.add_argument("--no-openai", action="store_true", help="do not start the OpenAI-compatible API")
    serve.add_argument("--openai-workers", type=int, default=0,
                       help="processes of the OpenAI API (0: 1 on CPU, up to 4 on a GPU server; default: %(default)s)")
    serve.add_argument("--model-name", default=None,
                       help="the model name the OpenAI API reports (default: the checkpoint directory's name, "
                            "tritonkv-demo for the demo model)")
    serve.add_argument("--instances", type=int, default=1, help="instances per model (instance_group count)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind, every endpoint (default loopback)")
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
    serve.add_argument("--health-port", type=int, default=8003,
                       help="port of the supervisor's /health/live and /health/ready (default: %(default)s)")
    serve.add_argument("--no-supervisor", action="store_true",
                       help="run tritonserver without the supervisor (serve then exits when it does)")
    serve.add_argument("--stuck-after", type=float, default=60.0,
                       help="seconds an engine may go without a loop iteration (an idle engine still loops once a "
                            "second), or Triton may stay not ready, before the supervisor restarts the server "
                            "(0: never; default: %(default)s)")
    engine_names = add_engine_flags(serve)
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
        from tritonkv.engine.capacity_report import run

        return run(args)
    if args.command == "serve":
        params = engine_params(args, engine_names, serve)
        # serve_forever reads args.param: the flags travel as --param pairs
        args.param = [f"{k}={v}" for k, v in params.items()]
        if args.no_openai:
            args.openai_port = None
        from tritonkv.server.launcher import ServerStartError
        from tritonkv.server.serve import serve_forever

        try:
            return serve_forever(args)
        except ServerStartError as exc:
            print(f"tritonkv serve: {exc}", file=sys.stderr, flush=True)
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
