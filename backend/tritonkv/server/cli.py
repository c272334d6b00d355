"""``tritonkv`` command line: ``tritonkv serve [CHECKPOINT_DIR] ...``, ``tritonkv capacity ...``,
``tritonkv install-backend DIR``.

``serve`` has a flag for every ``EngineConfig`` field (``--kv-cache-memory-mb 1024``,
``--enable-prefix-caching / --no-enable-prefix-caching``, ...), generated from the dataclass
with the comment beside (or above) each field as its help, so a field added there is a flag
here; a field with a fixed set of values lists them (``choices``). A flag given becomes the
config.pbtxt parameter of both models; a flag not given leaves the repository's value.
``--param KEY=VALUE`` sets any parameter too (not the same key as a flag).

Rule: everything ``serve`` can check without starting anything is checked before the start,
with the code the backend uses (``EngineConfig.from_parameters`` on the repository's
parameters merged with the flags): a bad value exits 2 at once naming the flag and what it
accepts, instead of a model load that fails later.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import re
import sys

from tritonkv import config as engine_config
from tritonkv.config import EngineConfig
from tritonkv.openai_frontend.tool_parsers import PARSERS
from tritonkv.server.launcher import DEFAULT_OPENAI_PORT, DEFAULT_REPOSITORY, RESTRICTED_APIS
from tritonkv.server.repository import STATELESS_MODEL, check_model_name

POSITIONAL_FIELDS = ("checkpoint",)  # given as serve's positional argument
# EngineConfig fields with a fixed set of values: the flag lists them
CHOICES = {"device": engine_config.DEVICES, "dtype": engine_config.DTYPES,
           "kv_cache_dtype": engine_config.KV_CACHE_DTYPES, "kv_eviction": engine_config.KV_EVICTIONS}
TRITON_APIS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
               "statistics", "trace", "logging")
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
        elif f.name in CHOICES:
            group.add_argument(flag, dest=f"engine_{f.name}", choices=CHOICES[f.name], default=None,
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


def repository_parameters(repository: str = DEFAULT_REPOSITORY, model: str = "llm") -> dict[str, str]:
    """The string parameters of ``model``'s config.pbtxt (what the backend starts from)."""
    with open(os.path.join(repository, model, "config.pbtxt")) as f:
        text = f.read()
    return dict(re.findall(r'parameters \{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}', text))


def check_engine_settings(params: dict[str, str], checkpoint: str | None, flags_given: set[str]) -> str | None:
    """None if the backend would accept these settings (the repository's parameters with
    ``params`` over them), else the reason, naming the flag (or --param) that set the value."""
    merged = {**repository_parameters(), **params}
    if checkpoint is not None:
        merged["checkpoint"] = checkpoint
    try:
        EngineConfig.from_parameters(merged)
    except ValueError as exc:
        message = str(exc)
        m = re.match(r"(?:unknown )?parameter '(\w+)'", message)
        name = m.group(1) if m else None
        if name == "checkpoint":
            return f"CHECKPOINT: {message}"
        if name in flags_given:
            return f"--{name.replace('_', '-')}: {message}"
        if name in params:
            return f"--param {name}=...: {message}"
        return f"model repository parameter: {message}"
    return None


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"{value} is not a port: 1-65535, or 0 for a free port")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 0 seconds")
    return value


def api_list(text: str) -> str:
    apis = [a for a in text.split(",") if a]
    bad = [a for a in apis if a not in TRITON_APIS + ("none",)]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown API {bad[0]!r}: choose from {', '.join(TRITON_APIS)}, or none")
    return text


def stateless_name(text: str) -> str:
    try:
        return check_model_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


PORT_HELP = "(0: a free port, printed at start; a port in use fails at once naming this flag)"


def add_serve_parser(sub) -> tuple[argparse.ArgumentParser, list[str]]:
    serve = sub.add_parser("serve", help="start tritonserver with the llm / llm_stateless models")
    serve.add_argument("checkpoint", nargs="?", default=None,
                       help="HF checkpoint directory, or an ONNX export (directory or .onnx file, docs/onnx.md); "
                            "default: the generated demo model")
    serve.add_argument("--http-port", type=port, default=8000, help=f"Triton's HTTP port {PORT_HELP}; "
                       "default: %(default)s")
    serve.add_argument("--grpc-port", type=port, default=8001, help=f"Triton's gRPC port {PORT_HELP}; "
                       "default: %(default)s")
    serve.add_argument("--metrics-port", type=port, default=8002, help=f"Prometheus /metrics port {PORT_HELP}; "
                       "default: %(default)s")
    serve.add_argument("--openai-port", type=port, default=DEFAULT_OPENAI_PORT,
                       help=f"port of the OpenAI-compatible API (/v1/...) {PORT_HELP}; default: %(default)s")
    serve.add_argument("--no-openai", action="store_true", help="do not start the OpenAI-compatible API")
    serve.add_argument("--openai-workers", type=int, default=0,
                       help="processes of the OpenAI API (0: 1 on CPU, up to 4 on a GPU server; default: %(default)s)")
    serve.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                       help="how the OpenAI API reads tool calls in the model's text (default: by the "
                            "checkpoint's model_type: llama -> llama3_json, qwen2 -> hermes)")
    serve.add_argument("--model-name", default=None,
                       help="the model name the OpenAI API reports (default: the checkpoint directory's name, "
                            "tritonkv-demo for the demo model)")
    serve.add_argument("--stateless-model-name", type=stateless_name, default=STATELESS_MODEL,
                       help="Triton name of the one-shot model (default: %(default)s); e.g. vllm_model so that "
                            "clients of Triton's vLLM backend (samples/client.py -m vllm_model) run unchanged")
    serve.add_argument("--instances", type=positive_int, default=1, help="instances per model (instance_group "
                       "count; default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind, every endpoint (default loopback)")
    serve.add_argument("--verbose", action="store_true", help="server log on the console")
    serve.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="model parameter for both models, e.g. pool_name=mine or kv_cache_memory_mb=1024 "
                            "(config.pbtxt parameters; repeatable)")
    serve.add_argument("--restricted-api", type=api_list, default=",".join(RESTRICTED_APIS),
                       help="Triton APIs (HTTP and gRPC) closed to clients, comma-separated, or 'none' "
                            "(default: %(default)s; see docs/security.md)")
    serve.add_argument("--admin-key", action="store_true",
                       help="open the restricted APIs to callers with a key, written to <workdir>/admin-key (0600); "
                            "tritonserver 2.51 takes it on its command line, so local users can read it in /proc "
                            "unless /proc is private (default: closed to everyone)")
    serve.add_argument("--exit-timeout", type=non_negative_float, default=1.5,
                       help="seconds a stop lets in-flight requests finish before the server is ended; serve "
                            "exits within about this + 1 s (default: %(default)s)")
    serve.add_argument("--health-port", type=port, default=8003,
                       help=f"port of the supervisor's /health/live and /health/ready {PORT_HELP}; "
                            "default: %(default)s")
    serve.add_argument("--no-supervisor", action="store_true",
                       help="run tritonserver without the supervisor (serve then exits when it does)")
    serve.add_argument("--stuck-after", type=non_negative_float, default=60.0,
                       help="seconds an engine may go without a loop iteration (an idle engine still loops once a "
                            "second), or the server may stay not ready, before the supervisor restarts the server "
                            "(0: never; default: %(default)s)")
    return serve, add_engine_flags(serve)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tritonkv", description="paged-KV LLM serving on Triton")
    sub = parser.add_subparsers(dest="command", required=True)
    serve, engine_names = add_serve_parser(sub)
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
    install = sub.add_parser("install-backend", help="install tritonkv as a Triton backend (backend: \"tritonkv\") "
                                                     "into a backend directory")
    install.add_argument("backend_dir", metavar="DIR", help="Triton's backend directory (--backend-directory)")
    install.add_argument("--no-python-backend", action="store_true",
                         help="install only DIR/tritonkv; DIR/python must already hold Triton's Python backend")
    args = parser.parse_args(argv)
    if args.command == "install-backend":
        from tritonkv.server.install_backend import main as install_main

        return install_main([args.backend_dir] + (["--no-python-backend"] if args.no_python_backend else []))
    if args.command == "capacity":
        bad = [p for p in args.param if "=" not in p]
        if bad:
            parser.error(f"--param takes KEY=VALUE, got {bad[0]!r}")
        from tritonkv.engine.capacity_report import run

        return run(args)
    if args.command == "serve":
        params = engine_params(args, engine_names, serve)
        if args.checkpoint is not None and not os.path.exists(args.checkpoint):
            serve.error(f"CHECKPOINT {args.checkpoint!r}: no such file or directory")
        given = {n for n in engine_names if getattr(args, f"engine_{n}") is not None}
        problem = check_engine_settings(params, os.path.abspath(args.checkpoint) if args.checkpoint else None, given)
        if problem:
            serve.error(problem)
        # serve_forever reads args.param: the flags travel as --param pairs
        args.param = [f"{k}={v}" for k, v in params.items()]
        if args.no_openai:
            args.openai_port = None
        from tritonkv.server.errors import ServerStartError
        from tritonkv.server.serve import serve_forever

        try:
            return serve_forever(args)
        except ServerStartError as exc:
            print(f"tritonkv serve: {exc}", file=sys.stderr, flush=True)
            return 1
    return 2


def entry() -> None:
    """The ``tritonkv`` command. After ``serve`` has stopped its whole tree the process ends at
    once (``os._exit``): tearing down the interpreter (torch, gRPC) would only delay the exit
    a supervisor or Kubernetes is waiting for."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
