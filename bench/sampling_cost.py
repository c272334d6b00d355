"""Decode throughput of the in-process engine with the sampling settings of issue 24 on every
row, against greedy: penalties + top_p + min_p (target <= 3% slower at c=64) and logprobs with
top_logprobs 5 (target <= 5%). Each setting runs the same prompts at one concurrency, twice
(the better wall time is kept: the first pass also warms caches).

    python bench/sampling_cost.py --synthetic llama3-8b --concurrency 64 \
        --engine-param dtype=bfloat16 --engine-param kv_cache_memory_mb=40000 \
        --engine-param max_num_seqs=128 --engine-param max_num_batched_tokens=8192 \
        --out bench/results/sampling_h200.md
    python bench/sampling_cost.py --concurrency 8 --max-tokens 32     # CPU smoke (demo model)

A second table: one request with n = 8 (``--samples``) on a 1,024-token prompt
(``--samples-prompt-tokens``) against the same request with n = 1 and against 8 separate
requests of the prompt: time to the first token (median of ``--samples-repeats`` fresh
prompts, so no prefix-cache hit), time to the last, and the prompt tokens the engine computed
(the n samples share one prefill: engine/sample_group.py; separate requests share blocks only
through the prefix cache, once one of them has computed and committed them). Target: TTFT of
n = 8 within 10% of n = 1. On a GPU:

    python bench/sampling_cost.py --device cuda --synthetic llama3-8b --engine-param dtype=bfloat16 \
        --engine-param kv_cache_memory_mb=40000 --only-samples --out bench/results/sampling_n_h200.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def settings(name: str, max_tokens: int, seed: int):
    from tritonkv.sampling.params import SamplingParams

    base = dict(max_tokens=max_tokens, ignore_eos=True)
    if name == "greedy":
        return SamplingParams(temperature=0.0, **base)
    if name == "penalties+top_p+min_p":
        return SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
                              frequency_penalty=0.5, seed=seed, **base)
    if name == "greedy+logprobs5":
        return SamplingParams(temperature=0.0, logprobs=5, **base)
    raise ValueError(name)


MODES = ("greedy", "penalties+top_p+min_p", "greedy+logprobs5")


def run(engine, prompts, mode: str, max_tokens: int) -> float:
    """Generated tokens per second with every prompt in flight at once."""
    done = threading.Semaphore(0)
    errors = []

    def emit(out):
        if out.finished:
            if out.error:
                errors.append(out.error)
            done.release()

    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.submit((mode, i, time.perf_counter()), prompt, settings(mode, max_tokens, i), emit, start=True,
                      end=True, stateless=True)
    for _ in prompts:
        done.acquire()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(errors[0])
    return len(prompts) * max_tokens / wall


def first_token_times(engine, prompt, params) -> tuple[float, float, int]:
    """(seconds to the first output with a token, seconds to the last, prompt tokens computed)
    of one request alone on an idle engine."""
    done = threading.Event()
    first = []

    def emit(out):
        if out.token_ids and not first:
            first.append(time.perf_counter())
        if out.error:
            raise RuntimeError(out.error)
        if out.finished:
            done.set()

    before = _prefill_tokens(engine)
    start = time.perf_counter()
    engine.submit(("samples", start), prompt, params, emit, start=True, end=True, stateless=True)
    done.wait()
    return first[0] - start, time.perf_counter() - start, _prefill_tokens(engine) - before


def _prefill_tokens(engine) -> int:
    """Tokens computed in prefill or mixed steps so far (a sample's first token included)."""
    sums = engine.step_times.kinds.get("prefill_or_mixed")
    return 0 if sums is None else sums.tokens


def separate_requests(engine, prompt, params, count: int) -> tuple[float, float, int]:
    """``count`` copies of one request submitted together (n = 1 each, seeds s + i): the cost
    of n samples without the shared prefill (first token of any, last of all, tokens)."""
    left = threading.Semaphore(0)
    first = []

    def emit(out):
        if out.token_ids and not first:
            first.append(time.perf_counter())
        if out.finished:
            left.release()

    before = _prefill_tokens(engine)
    start = time.perf_counter()
    for i in range(count):
        engine.submit(("separate", start, i), prompt, replace(params, seed=params.seed + i), emit, start=True,
                      end=True, stateless=True)
    for _ in range(count):
        left.acquire()
    return first[0] - start, time.perf_counter() - start, _prefill_tokens(engine) - before


def samples_table(engine, vocab: int, args) -> list[str]:
    from serving_benchmark import make_prompts
    from tritonkv.sampling.params import SamplingParams

    n, tokens = args.samples, args.samples_prompt_tokens
    prompts = make_prompts(3 * args.samples_repeats + 1, tokens, vocab, seed=1)
    base = SamplingParams(max_tokens=args.samples_max_tokens, temperature=0.8, seed=0, ignore_eos=True)
    first_token_times(engine, prompts[-1], base)  # warm-up
    cases = {f"n = 1": (base, 1), f"n = {n} (one prefill, shared blocks)": (replace(base, n=n), 1),
             f"{n} separate requests (n = 1, seeds s + i; prefix cache on)": (base, n)}
    rows = []
    for k, (label, (params, copies)) in enumerate(cases.items()):
        runs = [first_token_times(engine, prompts[k * args.samples_repeats + r], params) if copies == 1
                else separate_requests(engine, prompts[k * args.samples_repeats + r], params, copies)
                for r in range(args.samples_repeats)]
        ttft = statistics.median(r[0] for r in runs)
        rows.append((label, ttft, statistics.median(r[1] for r in runs), runs[0][2]))
    lines = [f"## n = {n} samples of one {tokens}-token prompt ({args.samples_max_tokens} tokens each; median of "
             f"{args.samples_repeats})", "",
             "| request | TTFT ms | vs n = 1 | last token ms | prompt tokens computed |", "|---|---|---|---|---|"]
    for label, ttft, last, computed in rows:
        lines.append(f"| {label} | {1000 * ttft:.1f} | {100 * (ttft / rows[0][1] - 1):+.1f}% | {1000 * last:.1f} "
                     f"| {computed} |")
    lines.append("")
    lines.append(f"forked block references: {engine.kv.forked_blocks} (`tritonkv_forked_blocks_total`)")
    return lines


def main(argv=None) -> int:
    from serving_benchmark import inprocess_engine, make_prompts
    from synthetic_checkpoint import write_synthetic
    from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
    from tritonkv.model.model_config import ModelConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic", choices=("llama3-8b", "llama-1b"), default=None)
    p.add_argument("--synthetic-dir", default="/tmp/tritonkv-synthetic")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--engine-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--device", default=None, help="the engine's device (cpu / cuda; default: the engine's)")
    p.add_argument("--samples", type=int, default=8, help="n of the shared-prefill table")
    p.add_argument("--samples-prompt-tokens", type=int, default=1024)
    p.add_argument("--samples-max-tokens", type=int, default=16)
    p.add_argument("--samples-repeats", type=int, default=5)
    p.add_argument("--only-samples", action="store_true", help="only the n = --samples table")
    p.add_argument("--out", default=None, help="write the table to this markdown file")
    args = p.parse_args(argv)
    checkpoint = (write_synthetic(args.synthetic, os.path.join(args.synthetic_dir, args.synthetic))
                  if args.synthetic else ensure_demo_checkpoint())
    params = dict(kv.split("=", 1) for kv in args.engine_param)
    if args.device:
        params["device"] = args.device
    engine = inprocess_engine(checkpoint, params, graphs=not args.no_graphs)
    lines = [f"# Sampling cost ({args.synthetic or 'demo'}, device {engine.device})", ""]
    try:
        vocab = ModelConfig.from_checkpoint(checkpoint).vocab_size
        rates = {}
        if not args.only_samples:
            prompts = make_prompts(args.concurrency, args.prompt_tokens, vocab, seed=0)
            for mode in MODES:
                rates[mode] = max(run(engine, prompts, mode, args.max_tokens) for _ in range(2))
        sample_lines = samples_table(engine, vocab, args) if args.samples > 1 else []
    finally:
        engine.stop_loop()
    if rates:
        lines += [f"## Sampling settings on every row vs greedy (c={args.concurrency}, "
                  f"{args.prompt_tokens} in / {args.max_tokens} out)", "",
                  "| setting | tokens/s | vs greedy |", "|---|---|---|"]
        for mode, rate in rates.items():
            lines.append(f"| {mode} | {rate:.0f} | {100 * (rate / rates['greedy'] - 1):+.1f}% |")
        lines.append("")
    lines += sample_lines
    text = "\n".join(lines) + "\n\n`python bench/sampling_cost.py " + " ".join(argv or sys.argv[1:]) + "`\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
