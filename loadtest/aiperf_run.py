"""aiperf (NVIDIA's LLM load generator) against the OpenAI endpoint: chat and completions,
streamed, synthetic prompts; prints a table, writes it as markdown, and fails on any error.

    python loadtest/aiperf_run.py                       # starts a server (demo model), CI-sized;
                                                        # report: loadtest/results/aiperf.md
    python loadtest/aiperf_run.py --concurrency 16 --requests 400 --isl 256 --osl 128 \\
        --out loadtest/results/aiperf_long.md            # the longer run, by hand
    python loadtest/aiperf_run.py --url http://127.0.0.1:9000 --model NAME --tokenizer DIR

Nothing comes from a hub: aiperf counts tokens with the served checkpoint's own tokenizer
directory (``--tokenizer``, default: the demo checkpoint; ``tritonkv serve`` prints the path
of the checkpoint it serves, "tokenizer ...") and takes the token counts the
server reports (``usage``, with ``--use-server-token-count``), so prompt tokens include the
chat template's. ``ignore_eos`` makes every answer exactly ``--osl`` tokens long.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "backend"))

# (label, key in profile_export_aiperf.json, statistic)
COLUMNS = (
    ("requests", "completed_request_count", "avg"),
    ("errors", "error_request_count", "avg"),
    ("req/s", "request_throughput", "avg"),
    ("out tok/s", "output_token_throughput", "avg"),
    ("TTFT p50 ms", "time_to_first_token", "p50"),
    ("TTFT p99 ms", "time_to_first_token", "p99"),
    ("ITL p50 ms", "inter_token_latency", "p50"),
    ("ITL p99 ms", "inter_token_latency", "p99"),
    ("latency p99 ms", "request_latency", "p99"),
    ("prompt tok", "usage_prompt_tokens", "avg"),
    ("out tok", "output_sequence_length", "avg"),
)


def aiperf_executable() -> str:
    """The aiperf installed beside this interpreter (a venv's bin/, on PATH or not), else PATH's."""
    beside = os.path.join(os.path.dirname(sys.executable), "aiperf")
    return beside if os.access(beside, os.X_OK) else "aiperf"


def aiperf_command(url: str, model: str, tokenizer: str, endpoint: str, args, artifacts: str) -> list[str]:
    return [aiperf_executable(), "profile", "--model", model, "--url", url, "--endpoint-type", endpoint, "--streaming",
            "--tokenizer", tokenizer, "--concurrency", str(args.concurrency), "--request-count", str(args.requests),
            "--warmup-request-count", str(args.warmup),
            "--synthetic-input-tokens-mean", str(args.isl), "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(args.osl), "--output-tokens-stddev", "0",
            "--extra-inputs", "ignore_eos:true", "--use-server-token-count", "--random-seed", "0",
            "--artifact-dir", artifacts, "--ui", "none", "--no-server-metrics"]


def run_one(url, model, tokenizer, endpoint, args, workdir) -> dict:
    artifacts = os.path.join(workdir, endpoint)
    cmd = aiperf_command(url, model, tokenizer, endpoint, args, artifacts)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    took = time.monotonic() - t0
    path = os.path.join(artifacts, "profile_export_aiperf.json")
    if proc.returncode != 0 or not os.path.isfile(path):
        raise SystemExit(f"aiperf {endpoint} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(path) as f:
        export = json.load(f)
    row = {"endpoint": endpoint, "wall_s": took, "errors_summary": export.get("error_summary") or [],
           "complete": export.get("is_complete", False) and not export.get("was_cancelled", False)}
    for label, key, stat in COLUMNS:
        value = export.get(key)
        row[label] = 0.0 if value is None and key == "error_request_count" else (value or {}).get(stat)
    return row


def table(rows) -> str:
    head = ["endpoint"] + [label for label, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["endpoint"]] + [_fmt(row[label]) for label, _, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:.1f}"


DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "aiperf.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="OpenAI base URL without /v1 (default: start a server here)")
    p.add_argument("--model", default="tritonkv-demo")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the demo checkpoint)")
    p.add_argument("--endpoints", default="chat,completions")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=24, help="requests per endpoint")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--isl", type=int, default=64, help="synthetic prompt tokens")
    p.add_argument("--osl", type=int, default=16, help="output tokens per request")
    p.add_argument("--kv-cache-memory-mb", type=int, default=128, help="KV pool of the server started here")
    p.add_argument("--timeout-s", type=float, default=600, help="limit per aiperf run")
    p.add_argument("--out", default=DEFAULT_OUT, help="write the summary as markdown here (default: %(default)s)")
    args = p.parse_args(argv)

    from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
    from tritonkv.server.launcher import start_server

    tokenizer = args.tokenizer or ensure_demo_checkpoint()
    server_cm = None
    url = args.url
    if url is None:
        server_cm = start_server(extra_params={"kv_cache_memory_mb": str(args.kv_cache_memory_mb)}, openai_port=0)
        server = server_cm.__enter__()
        url = server.openai_url[:-len("/v1")]
        args.model = server.model_name
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="tritonkv-aiperf-") as workdir:
            for endpoint in args.endpoints.split(","):
                rows.append(run_one(url, args.model, tokenizer, endpoint, args, workdir))
    finally:
        if server_cm is not None:
            server_cm.__exit__(None, None, None)
    summary = table(rows)
    print(summary)
    failures = [r for r in rows if r["errors"] or r["errors_summary"] or not r["complete"]
                or r["requests"] != args.requests]
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(f"# aiperf against the OpenAI endpoint\n\n"
                    f"aiperf {_aiperf_version()}, streaming, synthetic prompts of {args.isl} tokens "
                    f"(+ chat template), {args.osl} output tokens (ignore_eos), concurrency {args.concurrency}, "
                    f"{args.requests} requests per endpoint after {args.warmup} warm-up; model {args.model}; "
                    f"{platform.machine()} {os.cpu_count()} CPUs; token counts from the server's usage.\n\n"
                    f"Command: `python loadtest/aiperf_run.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                    f"{summary}\n\nErrors: {sum(int(r['errors'] or 0) for r in rows)}.\n")
    if args.out:
        print(f"report: {args.out}")
    if failures:
        print(f"FAILED: {[(r['endpoint'], r['errors'], r['errors_summary']) for r in failures]}", file=sys.stderr)
        return 1
    return 0


def _aiperf_version() -> str:
    try:
        from importlib.metadata import version

        return version("aiperf")
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())
