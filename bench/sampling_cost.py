"""Decode throughput of the in-process engine with the sampling settings of issue 24 on every
row, against greedy: penalties + top_p + min_p (target <= 3% slower at c=64) and logprobs with
top_logprobs 5 (target <= 5%). Each setting runs the same prompts at one concurrency, twice
(the better wall time is kept: the first pass also warms caches).

    python bench/sampling_cost.py --synthetic llama3-8b --concurrency 64 \
        --engine-param dtype=bfloat16 --engine-param kv_cache_memory_mb=40000 \
        --engine-param max_num_seqs=128 --engine-param max_num_batched_tokens=8192 \
        --out bench/results/sampling_h200.md
    python bench/sampling_cost.py --concurrency 8 --max-tokens 32     # CPU smoke (demo model)
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

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
    p.add_argument("--out", default=None, help="write the table to this markdown file")
    args = p.parse_args(argv)
    checkpoint = (write_synthetic(args.synthetic, os.path.join(args.synthetic_dir, args.synthetic))
                  if args.synthetic else ensure_demo_checkpoint())
    params = dict(kv.split("=", 1) for kv in args.engine_param)
    engine = inprocess_engine(checkpoint, params, graphs=not args.no_graphs)
    try:
        vocab = ModelConfig.from_checkpoint(checkpoint).vocab_size
        prompts = make_prompts(args.concurrency, args.prompt_tokens, vocab, seed=0)
        rates = {}
        for mode in MODES:
            rates[mode] = max(run(engine, prompts, mode, args.max_tokens) for _ in range(2))
    finally:
        engine.stop_loop()
    lines = [f"# Sampling settings on every row vs greedy ({args.synthetic or 'demo'}, c={args.concurrency}, "
             f"{args.prompt_tokens} in / {args.max_tokens} out)", "",
             "| setting | tokens/s | vs greedy |", "|---|---|---|"]
    for mode, rate in rates.items():
        lines.append(f"| {mode} | {rate:.0f} | {100 * (rate / rates['greedy'] - 1):+.1f}% |")
    text = "\n".join(lines) + "\n\n`python bench/sampling_cost.py " + " ".join(argv or sys.argv[1:]) + "`\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
