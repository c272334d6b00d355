"""Serving benchmark: output tokens/s, TTFT and TPOT percentiles at concurrency 1, 4, 16, 64.

Systems, all on the same checkpoint (default: the generated demo model), greedy, fp32:
- ``tritonkv``: this backend behind tritonserver (launcher, loopback), gRPC streaming on
  ``llm_stateless`` through ``tritonkv_client``; paged KV cache, continuous batching;
- ``no-kv-cache``: the same weights in HF ``LlamaForCausalLM`` called with ``use_cache=False``:
  the whole context is recomputed for every output token (the seed documents' baseline);
- ``hf-generate``: HF ``generate`` with its own KV cache, in-process — what a hand-written
  Python backend would run.
The two baselines run in this process behind one FIFO worker (one request at a time, as a
Python backend instance without batching executes them); ``c`` client threads submit to it, so
queueing shows up in TTFT. They pay no server or network cost; tritonkv pays both.

Workload per concurrency level c: ``max(c, --min-requests)`` requests, ``c`` closed-loop
clients; every request has its own random prompt of ``--prompt-tokens`` ids (no prefix
sharing) and generates exactly ``--max-tokens`` tokens (ignore_eos). TTFT = submit -> first
token; TPOT = (last token - first token) / (tokens - 1); throughput = all output tokens / wall
time of the level.

    python bench/serving_benchmark.py                 # writes bench/results/serving.{md,json,png}
    python bench/serving_benchmark.py --quick         # concurrency 1 and 4, few requests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (os.path.join(ROOT, "client"), os.path.join(ROOT, "backend"), os.path.join(ROOT, "loadtest")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

SYSTEMS = ("tritonkv", "no-kv-cache", "hf-generate", "inprocess", "inprocess-eager")


@dataclass
class Sample:
    tokens: list[int]
    ttft_s: float
    tpot_s: float | None
    e2e_s: float


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation between ranks); None for no values."""
    return float(np.percentile(values, q)) if values else None


def make_prompts(n: int, prompt_tokens: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, min(vocab, 256)) for _ in range(prompt_tokens)] for _ in range(n)]


# -- in-process baselines ----------------------------------------------------------------------
class _TimingStreamer:
    """HF streamer that timestamps each new token (generate's first ``put`` is the prompt)."""

    def __init__(self, on_token):
        self.on_token = on_token
        self.seen_prompt = False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_token([int(v) for v in value.reshape(-1)])

    def end(self):
        pass


def hf_generate_fn(model):
    @torch.inference_mode()
    def run(prompt, max_tokens, on_token):
        ids = torch.tensor([prompt], device=model.device)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                       min_new_tokens=max_tokens, do_sample=False, streamer=_TimingStreamer(on_token),
                       pad_token_id=model.config.eos_token_id)
    return run


def no_kv_cache_fn(model):
    @torch.inference_mode()
    def run(prompt, max_tokens, on_token):
        ids = list(prompt)
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids], device=model.device), use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            ids.append(token)
            on_token([token])
    return run


class SerialBackend:
    """One worker running one request at a time, FIFO: a Python backend instance without batching."""

    def __init__(self, generate):
        self.generate = generate
        self.jobs: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._loop, daemon=True)
        self.worker.start()

    def _loop(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            prompt, max_tokens, on_token, done = job
            try:
                self.generate(prompt, max_tokens, on_token)
            finally:
                done.set()

    def request(self, prompt, max_tokens) -> Sample:
        times, tokens, done = [], [], threading.Event()

        def on_token(ids):
            now = time.perf_counter()
            times.extend([now] * len(ids))
            tokens.extend(ids)

        sent = time.perf_counter()
        self.jobs.put((prompt, max_tokens, on_token, done))
        done.wait()
        end = time.perf_counter()
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
        return Sample(tokens, times[0] - sent, tpot, end - sent)

    def close(self):
        self.jobs.put(None)


def tritonkv_requester(grpc_url: str):
    from tritonkv_client import Client

    local = threading.local()

    def request(prompt, max_tokens) -> Sample:
        if not hasattr(local, "client"):
            local.client = Client(grpc_url, temperature=0.0, ignore_eos=True)
        r = local.client.generate(input_ids=prompt, max_tokens=max_tokens)
        assert r.finish_reason == "length" and r.num_tokens == max_tokens, (r.finish_reason, r.num_tokens)
        return Sample(r.token_ids, r.ttft_s, r.tpot_s, r.e2e_s)

    return request


def inprocess_engine(checkpoint: str, engine_params: dict, graphs: bool):
    """The engine of the server, built and driven in this process (no tritonserver)."""
    from tritonkv.config import EngineConfig
    from tritonkv.engine.factory import build_engine

    engine = build_engine(EngineConfig(checkpoint=checkpoint, **{**engine_params, "enable_cuda_graphs": graphs}))
    engine.start_loop()
    return engine


def inprocess_requester(engine):
    from inprocess import engine_request

    def request(prompt, max_tokens) -> Sample:
        return Sample(*engine_request(engine, prompt, max_tokens))

    return request


# -- driver ------------------------------------------------------------------------------------
def run_level(request, prompts: list[list[int]], concurrency: int, max_tokens: int):
    samples: list[Sample | None] = [None] * len(prompts)
    next_index = iter(range(len(prompts)))
    lock = threading.Lock()
    errors = []

    def client():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                samples[i] = request(prompts[i], max_tokens)
            except Exception as e:  # a failed request fails the benchmark
                errors.append(repr(e))
                return

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return samples, wall


def summarize(samples: list[Sample], wall: float) -> dict:
    ttft = [s.ttft_s * 1000 for s in samples]
    tpot = [s.tpot_s * 1000 for s in samples if s.tpot_s is not None]
    tokens = sum(len(s.tokens) for s in samples)
    return {
        "requests": len(samples), "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
        **{f"ttft_p{q}_ms": percentile(ttft, q) for q in (50, 90, 99)},
        **{f"tpot_p{q}_ms": percentile(tpot, q) for q in (50, 90, 99)},
        "e2e_p50_ms": percentile([s.e2e_s * 1000 for s in samples], 50),
        "ttft_ms": ttft,
    }


def markdown(results: dict, levels: list[int]) -> str:
    lines = ["| system | concurrency | requests | output tok/s | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | e2e p50 ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for system, per_level in results.items():
        for c in levels:
            r = per_level.get(str(c))
            if r is None:
                continue
            f = lambda k: "-" if r[k] is None else f"{r[k]:.1f}"  # noqa: E731
            lines.append(f"| {system} | {c} | {r['requests']} | {r['output_tokens_per_s']:.1f} "
                         f"| {f('ttft_p50_ms')} / {f('ttft_p90_ms')} / {f('ttft_p99_ms')} "
                         f"| {f('tpot_p50_ms')} / {f('tpot_p90_ms')} / {f('tpot_p99_ms')} | {f('e2e_p50_ms')} |")
    return "\n".join(lines)


def plot(results: dict, levels: list[int], cdf_levels: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(SYSTEMS, ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:gray")))
    for system, per_level in results.items():
        cs = [c for c in levels if str(c) in per_level]
        ax1.plot(cs, [per_level[str(c)]["output_tokens_per_s"] for c in cs], "o-", label=system, color=colors[system])
        for c, style in zip(cdf_levels, ("-", "--", ":")):
            if str(c) not in per_level:
                continue
            ttft = sorted(per_level[str(c)]["ttft_ms"])
            ax2.step(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], style, where="post",
                     color=colors[system], label=f"{system}, c={c}")
    ax1.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="output tokens/s",
            title="Throughput vs concurrency")
    ax1.set_xticks(levels, [str(c) for c in levels])
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    ax2.set(xscale="log", xlabel="time to first token (ms)", ylabel="fraction of requests", title="TTFT CDF")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def agreement(results_tokens: dict) -> dict:
    """Fraction of requests whose greedy tokens equal tritonkv's, per baseline."""
    ref = results_tokens.get("tritonkv")
    out = {}
    for system, toks in results_tokens.items():
        if system == "tritonkv" or ref is None:
            continue
        pairs = [(a, b) for a, b in zip(ref, toks) if a is not None and b is not None]
        out[system] = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    return out


def breakdown_table(summary: dict) -> str:
    """Mean milliseconds per step of each phase, per kind of step."""
    phases = ("schedule", "prepare", "forward", "sample", "wait", "emit")
    lines = ["| step kind | steps | mean seqs | " + " | ".join(f"{p} ms" for p in phases) + " | total ms |",
             "|---|---:|---:|" + "---:|" * (len(phases) + 1)]
    for kind, r in sorted(summary.items()):
        lines.append(f"| {kind} | {r['steps']} | {r['mean_seqs']:.1f} | "
                     + " | ".join(f"{r[p + '_ms']:.2f}" for p in phases) + f" | {r['total_ms']:.2f} |")
    return "\n".join(lines)


def prefill_rate(request, vocab: int, reference: dict, tokens: int = 4096) -> dict:
    """TTFT of one 4k-token prompt (median of 3) and its rate against the measured matmul rate;
    FLOPs: 2 x weights (embedding excluded) per token plus causal attention."""
    import statistics

    cfg = reference["model"]
    ttft = statistics.median(request(make_prompts(1, tokens, vocab, seed=10 + i)[0], 1).ttft_s for i in range(3))
    linear = tokens * reference["prefill_flops_per_token_GF"] * 1e9
    attention = 2 * cfg["layers"] * cfg["heads"] * cfg["head_dim"] * tokens * tokens  # QK^T + PV, causal half
    rate = (linear + attention) / ttft
    out = {"tokens": tokens, "ttft_ms": ttft * 1000, "TFLOPs": rate / 1e12,
           "fraction_of_matmul_rate": rate / (reference["bf16_matmul_TFLOPs"] * 1e12)}
    print(f"prefill {tokens} tokens: {out}", flush=True)
    return out


def reference_numbers(args, checkpoint, engine_params, device, prompts) -> dict:
    """The floor from a copy-bandwidth measurement, and HF generate in one batch, same run."""
    from inprocess import copy_bandwidth, hf_batch_generate, kv_bytes_per_token, weight_stream_bytes
    from tritonkv.model.llama import CausalLM
    from tritonkv.model.model_config import ModelConfig

    bw = copy_bandwidth(device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize(device)
    mm_rate = 20 * 2 * 8192 ** 3 / (time.perf_counter() - t0)
    del a
    cfg = ModelConfig.from_checkpoint(checkpoint)
    with torch.device("meta"):
        weights = weight_stream_bytes(CausalLM(cfg).to(torch.bfloat16))
    kv_tok = kv_bytes_per_token(cfg, 2)
    ref_model = {"layers": cfg.num_layers, "heads": cfg.num_heads, "head_dim": cfg.head_dim}
    ref = {"copy_bandwidth_GBps": bw / 1e9, "weight_stream_GB": weights / 1e9,
           "bf16_matmul_TFLOPs": mm_rate / 1e12, "prefill_flops_per_token_GF": (weights - 2 * cfg.vocab_size * cfg.hidden_size) / 1e9,
           "model": ref_model}
    mean_ctx = args.prompt_tokens + args.max_tokens / 2
    for c in args.concurrency:
        step_s = (weights + c * mean_ctx * kv_tok) / bw
        ref[f"floor_c{c}"] = {"step_ms": step_s * 1000, "tok_per_s": c / step_s}
    for b in args.hf_batch or []:
        tps, _ = hf_batch_generate(checkpoint, prompts[:b], args.max_tokens, device)
        ref[f"hf_generate_batch{b}_tok_per_s"] = tps
        print(f"HF generate batch {b}: {tps:.1f} tok/s", flush=True)
    print(json.dumps(ref, indent=1), flush=True)
    return ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="HF-format checkpoint (default: the demo model)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--quick", action="store_true", help="concurrency 1 4, 4 requests, 32 tokens (smoke)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for serving.{md,json,png}")
    p.add_argument("--name", default="serving", help="file stem of the results")
    p.add_argument("--device", default="auto", help="device of the in-process baselines (auto: cuda if available); "
                   "the server picks KIND_GPU itself when CUDA is available")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (e.g. no matplotlib); plot later with --replot")
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNG and table of an earlier results file")
    p.add_argument("--synthetic", choices=("llama3-8b", "llama-1b"),
                   help="random bf16 weights of this shape (written once to --synthetic-dir); GPU settings "
                        "(bf16, 40 GB KV, 128 seqs, 8192-token steps), the in-process engine and HF batch "
                        "generate as references, and the copy-bandwidth floor")
    p.add_argument("--synthetic-dir", default="/tmp/tritonkv-synthetic")
    p.add_argument("--engine-param", action="append", default=[], metavar="KEY=VALUE",
                   help="engine setting for the server and the in-process engine (repeatable)")
    p.add_argument("--hf-batch", type=int, nargs="*", default=None,
                   help="HF generate over this many prompts in one batch (default with --synthetic: 1 64)")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            data = json.load(f)
        levels = data["meta"]["concurrency"]
        plot(data["results"], levels, [c for c in (16, 64) if c in levels] or levels[-1:],
             os.path.splitext(args.replot)[0] + ".png")
        print(markdown(data["results"], levels))
        return 0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.quick:
        args.concurrency, args.min_requests, args.max_tokens = [1, 4], 4, 32
    from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

    engine_params = {}
    if args.synthetic:
        from synthetic_checkpoint import write_synthetic

        args.checkpoint = write_synthetic(args.synthetic, os.path.join(args.synthetic_dir, args.synthetic))
        engine_params = {"dtype": "bfloat16", "kv_cache_memory_mb": 40000, "max_num_seqs": 128,
                         "max_num_batched_tokens": 8192, "device": "cuda"}
        if args.hf_batch is None:
            args.hf_batch = [1, 64]
    engine_params.update(kv.split("=", 1) for kv in args.engine_param)
    checkpoint = os.path.abspath(args.checkpoint or ensure_demo_checkpoint())
    with open(os.path.join(checkpoint, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    n_max = max(max(args.concurrency), args.min_requests)
    prompts = make_prompts(n_max, args.prompt_tokens, vocab, seed=0)
    results: dict[str, dict] = {}
    tokens_at_c1: dict[str, list] = {}
    reference = reference_numbers(args, checkpoint, engine_params, device, prompts) \
        if device.type == "cuda" and args.synthetic else {}
    for system in args.systems:
        results[system] = {}
        engine = None
        if system == "tritonkv":
            from managed_server import managed_server

            server_params = {k: v for k, v in engine_params.items() if k != "device"}
            ctx = managed_server(checkpoint, pool_name=f"bench-{os.getpid()}", extra_params=server_params)
            server = ctx.__enter__()
            request, close = tritonkv_requester(server.grpc_url), lambda: ctx.__exit__(None, None, None)
        elif system.startswith("inprocess"):
            engine = inprocess_engine(checkpoint, engine_params, graphs=system == "inprocess")
            request = inprocess_requester(engine)

            def close(engine=engine):
                engine.stop_loop()
                engine.runner.graphs.clear()
                engine.close()
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
        else:
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval().to(device)
            backend = SerialBackend(hf_generate_fn(model) if system == "hf-generate" else no_kv_cache_fn(model))
            request, close = backend.request, backend.close
        try:
            # warm-up on other prompts: one full-size request, then a concurrent burst (kernel JIT
            # for prefill / decode / mixed batches, allocator growth, lazy init)
            warm = make_prompts(16, args.prompt_tokens, vocab, seed=1)
            request(warm[0], args.max_tokens)
            run_level(request, warm, min(16, max(args.concurrency)), 8)
            for c in args.concurrency:
                n = max(c, args.min_requests)
                if engine is not None:
                    engine.step_times.reset()
                samples, wall = run_level(request, prompts[:n], c, args.max_tokens)
                results[system][str(c)] = summarize(samples, wall)
                if engine is not None:
                    results[system][str(c)]["step_breakdown"] = engine.step_times.summary()
                    print(breakdown_table(engine.step_times.summary()), flush=True)
            if engine is not None and reference and system == "inprocess":
                results[system]["prefill_4k"] = prefill_rate(request, vocab, reference)
                if c == args.concurrency[0]:
                    tokens_at_c1[system] = [s.tokens for s in samples]
                r = results[system][str(c)]
                print(f"{system:12s} c={c:<3d} {r['output_tokens_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:8.1f} ms"
                      f"  TPOT p50 {r['tpot_p50_ms']:6.1f} ms  ({n} requests, {wall:.1f}s)", flush=True)
        finally:
            close()
    meta = {
        "checkpoint": checkpoint if args.checkpoint else "generated demo model (demo-llama-v2, 6 layers, hidden 384, fp32)",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "min_requests": args.min_requests, "concurrency": args.concurrency,
        "no_kv_cache_baseline": "HF LlamaForCausalLM on the same weights, use_cache=False, whole context "
                                "recomputed for every output token, greedy",
        "greedy_tokens_equal_to_tritonkv_at_first_level": agreement(tokens_at_c1),
        "reference": reference,
        "engine_params": engine_params,
        "command": " ".join(["python", "bench/serving_benchmark.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    os.makedirs(args.out, exist_ok=True)
    table = markdown(results, args.concurrency)
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    cdf_levels = [c for c in (16, 64) if c in args.concurrency] or args.concurrency[-1:]
    if not args.no_plot:
        plot(results, args.concurrency, cdf_levels, stem + ".png")
    with open(stem + ".md", "w") as f:
        f.write("# Serving benchmark\n\n" + __doc__.split("\n\n", 1)[1].split("\n    python")[0] + "\n\n")
        f.write(table + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n")
        f.write(f"![throughput and TTFT CDF]({args.name}.png)\n")
    print(table)
    if reference:
        print(json.dumps(reference, indent=1))
    print(f"wrote {stem}.md, {stem}.json, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
