"""What the OpenAI frontend costs: streamed output tokens/s through ``/v1/completions`` (SSE,
the frontend process, then gRPC) against the gRPC path straight into ``llm_stateless``, in one
run against one server, at concurrency 16 and 64. Target: OpenAI >= 90% of gRPC.

Workload per concurrency level c and path: ``max(c, --min-requests)`` requests from ``c``
closed-loop async clients in this process; every request has its own random prompt of
``--prompt-tokens`` ids (sent as ids on both paths, so the model sees the same tokens; no
prefix is shared between requests or paths) and generates exactly ``--max-tokens`` tokens
(greedy, ignore_eos). The frontend's own CPU time per 1000 output tokens (from /proc) is the
load-independent part of its cost. Throughput = output tokens / wall time of the level (tokens counted
from the server's answers: output_ids on gRPC, ``usage.completion_tokens`` on OpenAI).
The paths alternate, ``--rounds`` times each, so a drift of the machine hits both; the table
shows the median run of each path.

    python bench/openai_overhead.py                        # CPU, demo model -> bench/results/openai_overhead_cpu.md
    python bench/openai_overhead.py --synthetic llama3-8b --prompt-tokens 200 --max-tokens 180 \\
        --min-requests 128 --kv-cache-memory-mb 40000 --max-num-seqs 128 --engine-param dtype=bfloat16 \\
        --engine-param max_num_batched_tokens=8192 --out bench/results/openai_overhead_h200.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "backend"))
sys.path.insert(0, HERE)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of process ``pid`` and its children (the frontend's
    workers), from Linux /proc."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def synthetic_with_tokenizer(shape: str, root: str) -> str:
    """A synthetic checkpoint (bench/synthetic_checkpoint.py) beside a tokenizer that gives
    every id its own non-empty text ("<id>"), so both paths stream one event per token as a
    real model's would; the weights are linked, not copied."""
    from synthetic_checkpoint import write_synthetic
    from tokenizers import Tokenizer, models

    weights = write_synthetic(shape, os.path.join(root, shape))
    path = os.path.join(root, f"{shape}-with-tokenizer")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(weights):
        if not os.path.exists(os.path.join(path, name)):
            os.symlink(os.path.join(weights, name), os.path.join(path, name))
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        with open(os.path.join(weights, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<0>")).save(
            os.path.join(path, "tokenizer.json"))
    return path


def make_prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, vocab) for _ in range(length)] for _ in range(n)]


async def grpc_request(client, prompt, max_tokens, ttfts) -> int:
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name, arr, dtype):
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    inputs = [tensor("input_ids", np.array(prompt, dtype=np.int32), "INT32"),
              tensor("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"),
              tensor("temperature", np.array([0.0], dtype=np.float32), "FP32"),
              tensor("ignore_eos", np.array([True]), "BOOL"), tensor("stream", np.array([True]), "BOOL")]
    done = asyncio.Event()

    async def one():
        yield {"model_name": "llm_stateless", "inputs": inputs}
        await done.wait()

    t0, tokens = time.perf_counter(), 0
    try:
        async for result, error in client.stream_infer(one()):
            if error is not None:
                raise RuntimeError(f"gRPC error: {error}")
            ids = result.as_numpy("output_ids")
            if tokens == 0 and ids is not None and len(ids):
                ttfts.append(time.perf_counter() - t0)
            tokens += 0 if ids is None else len(ids)
            if result.as_numpy("finish_reason") is not None:
                return tokens
    finally:
        done.set()
    raise RuntimeError("gRPC stream ended early")


async def openai_request(http, url, model, prompt, max_tokens, ttfts) -> int:
    import orjson

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0, first, usage = time.perf_counter(), True, None
    async with http.stream("POST", f"{url}/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = orjson.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if first and event["choices"] and event["choices"][0]["text"]:
                ttfts.append(time.perf_counter() - t0)
                first = False
            if event.get("usage"):
                usage = event["usage"]
    return usage["completion_tokens"]


async def client_share(path: str, urls: tuple[str, str, str], prompts, max_tokens: int, concurrency: int,
                       start_at: float) -> tuple[int, float, float, list[float]]:
    """One client process's share of a level: (output tokens, start, end, TTFTs)."""
    import httpx
    import tritonclient.grpc.aio as aio

    grpc_url, openai_url, model = urls
    queue = list(prompts)
    ttfts: list[float] = []
    grpc = aio.InferenceServerClient(grpc_url) if path == "grpc" else None
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    http = httpx.AsyncClient(timeout=600, limits=limits) if path == "openai" else None

    async def worker():
        total = 0
        while queue:
            prompt = queue.pop()
            if grpc is not None:
                total += await grpc_request(grpc, prompt, max_tokens, ttfts)
            else:
                total += await openai_request(http, openai_url, model, prompt, max_tokens, ttfts)
        return total

    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.time()
    try:
        totals = await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        if grpc is not None:
            await grpc.close()
        if http is not None:
            await http.aclose()
    return sum(totals), t0, time.time(), ttfts


def run_share(path, urls, prompts, max_tokens, concurrency, start_at):
    return asyncio.run(client_share(path, urls, prompts, max_tokens, concurrency, start_at))


def level(pool, path: str, urls, prompts, max_tokens: int, concurrency: int) -> dict:
    """``concurrency`` closed-loop clients over ``pool``'s processes; all start together."""
    procs = pool._processes if pool is not None else 1
    start_at = time.time() + 0.5
    shares = [(path, urls, prompts[i::procs], max_tokens, len(range(i, concurrency, procs)), start_at)
              for i in range(procs) if i < concurrency]
    results = pool.starmap(run_share, shares) if pool is not None else [run_share(*shares[0])]
    tokens = sum(r[0] for r in results)
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    ttfts = [t for r in results for t in r[3]]
    expected = len(prompts) * max_tokens
    if tokens != expected:
        raise RuntimeError(f"{path}: {tokens} output tokens, expected {expected}")
    return {"tok_s": tokens / wall, "ttft_p50_ms": 1000 * statistics.median(ttfts), "wall_s": wall, "requests": len(prompts)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="HF checkpoint directory (default: the demo model)")
    p.add_argument("--synthetic", choices=("llama3-8b", "llama-1b"), default=None,
                   help="random bf16 weights of this shape with an id-per-token tokenizer (GPU)")
    p.add_argument("--synthetic-dir", default="/tmp/tritonkv-synthetic")
    p.add_argument("--engine-param", action="append", default=[], metavar="KEY=VALUE",
                   help="more engine parameters, e.g. dtype=bfloat16 or max_num_batched_tokens=8192")
    p.add_argument("--concurrency", default="16,64")
    p.add_argument("--min-requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="runs of each path per level (alternating; median)")
    p.add_argument("--kv-cache-memory-mb", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--client-procs", type=int, default=0,
                   help="client processes sharing the concurrency (0: 1 on CPU, 4 on CUDA, where one Python "
                        "client cannot receive every token)")
    p.add_argument("--openai-workers", type=int, default=0, help="frontend processes (0: the launcher's choice)")
    p.add_argument("--out", default=None, help="markdown file (default: bench/results/openai_overhead_<cpu|cuda>.md)")
    args = p.parse_args(argv)

    import torch

    from tritonkv.server.launcher import start_server

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or os.path.join(HERE, "results", f"openai_overhead_{device}.md")
    params = {"kv_cache_memory_mb": str(args.kv_cache_memory_mb), "max_num_seqs": str(args.max_num_seqs),
              **dict(p.split("=", 1) for p in args.engine_param)}
    if args.synthetic:
        args.checkpoint = synthetic_with_tokenizer(args.synthetic, args.synthetic_dir)
    vocab = 256  # byte ids: valid for every vocabulary of interest
    rows = []
    load_before = os.getloadavg()[0]
    procs = args.client_procs or (4 if device == "cuda" else 1)
    pool = multiprocessing.get_context("spawn").Pool(procs) if procs > 1 else None
    with start_server(args.checkpoint, extra_params=params, openai_port=0,
                      openai_workers=args.openai_workers) as server:
        urls = (server.grpc_url, server.openai_url, server.model_name)
        workers = server.openai.workers
        seed = 0
        # warm-up: both paths, a few requests (model load paths, graphs, connection set-up)
        for path in ("grpc", "openai"):
            seed += 1
            level(pool, path, urls, make_prompts(8, args.prompt_tokens, seed, vocab), 8, 8)
        for c in (int(x) for x in args.concurrency.split(",")):
            n = max(c, args.min_requests)
            runs = {"grpc": [], "openai": []}
            for r in range(args.rounds):
                for path in (("grpc", "openai") if r % 2 == 0 else ("openai", "grpc")):
                    seed += 1
                    prompts = make_prompts(n, args.prompt_tokens, seed, vocab)
                    cpu0 = cpu_seconds(server.openai.process.pid)
                    result = level(pool, path, urls, prompts, args.max_tokens, c)
                    result["frontend_cpu_ms_per_ktok"] = (1e6 * (cpu_seconds(server.openai.process.pid) - cpu0)
                                                          / (n * args.max_tokens))
                    runs[path].append(result)
                    print(f"c={c} {path:6s} round {r}: {result['tok_s']:.1f} tok/s, TTFT p50 "
                          f"{result['ttft_p50_ms']:.0f} ms ({result['wall_s']:.1f} s), frontend CPU "
                          f"{result['frontend_cpu_ms_per_ktok']:.0f} ms per 1000 tokens", flush=True)
            grpc_tok = statistics.median(x["tok_s"] for x in runs["grpc"])
            openai_tok = statistics.median(x["tok_s"] for x in runs["openai"])
            rows.append((c, n, grpc_tok, openai_tok, openai_tok / grpc_tok,
                         statistics.median(x["ttft_p50_ms"] for x in runs["grpc"]),
                         statistics.median(x["ttft_p50_ms"] for x in runs["openai"]),
                         statistics.median(x["frontend_cpu_ms_per_ktok"] for x in runs["openai"])))
    lines = ["| concurrency | requests | gRPC tok/s | OpenAI tok/s | OpenAI / gRPC | TTFT p50 gRPC ms "
             "| TTFT p50 OpenAI ms | frontend CPU ms / 1k tokens |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {c} | {n} | {g:.1f} | {o:.1f} | {ratio:.1%} | {tg:.0f} | {to:.0f} | {cpu:.0f} |"
              for c, n, g, o, ratio, tg, to, cpu in rows]
    table = "\n".join(lines)
    if pool is not None:
        pool.close()
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(table)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else f"{platform.machine()}, {os.cpu_count()} CPUs"
    cmd = "python bench/openai_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(out, "w") as f:
        f.write(f"# OpenAI frontend overhead ({device})\n\nStreamed output tokens/s through /v1/completions "
                f"(SSE) vs the gRPC stream into llm_stateless, one server, {args.prompt_tokens}-token random "
                f"prompts, {args.max_tokens} output tokens (greedy, ignore_eos), median of {args.rounds} "
                f"alternating runs per path; clients in {procs} asyncio process(es) on the same machine; "
                f"the frontend in {workers} process(es) (its own CPU time per 1000 tokens in the last column). "
                f"Checkpoint: {args.checkpoint or 'demo model'}; {gpu}; {load}. Target: OpenAI >= 90% of gRPC.\n\n"
                f"Command: `{cmd.strip()}`\n\n{table}\n")
    print(f"wrote {out}")
    return 0 if all(row[4] >= 0.9 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
