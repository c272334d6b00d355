"""The engine's host work per step at high concurrency: schedule, prepare, emit (the phases
that are pure Python and run on the host whatever the device), measured on the CPU with a
minuscule Llama (1 layer, hidden 32) so the forward is small beside them.

Two measurements per concurrency ``c``:
- a wave of ``c`` requests with one 200-token prompt that the pool already caches (a shared
  system prompt): the first step's ``schedule`` (prefix lookups, block allocation for every
  row), then ``--max-tokens`` decode steps of ``c`` rows: each phase in ms per step
  (engine/step_times.py; eager decode: the CPU has no graphs and no overlap);
- the same wave with distinct prompts (no prefix hit): its prefill steps' ``schedule``.

The pool has ``--num-blocks`` blocks (the prefix lookup and the allocator's scans grow with
it; a Llama-3-8B pool of 40 GB holds ~20,000 16-token blocks).

    python bench/host_step_cost.py --out bench/results/host_step_cost_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "backend"), os.path.join(ROOT, "bench")]

import torch  # noqa: E402

from md_table import publish, table  # noqa: E402
from synthetic_checkpoint import random_llama  # noqa: E402

from tritonkv.config import EngineConfig  # noqa: E402
from tritonkv.engine.factory import build_engine  # noqa: E402
from tritonkv.engine.requests import SamplingParams  # noqa: E402

MICRO = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)


def one_level(path: str, c: int, args) -> dict:
    engine = build_engine(EngineConfig(checkpoint=path, device="cpu", block_size=16, num_blocks=args.num_blocks,
                                       max_num_seqs=c, max_num_batched_tokens=8192))
    shared = list(range(3, 3 + args.prompt_tokens))
    rnd = random.Random(c)

    def wave(tag: str, prompt, max_tokens: int) -> None:
        for i in range(c):
            engine.submit(f"{tag}{i}", prompt(), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                 ignore_eos=True), lambda out: None,
                          start=True, end=True)
        engine._drain()

    wave("warm", lambda: shared, 2)
    engine.run_until_idle()
    results = {}
    for name, prompt in (("hit", lambda: shared),
                         ("miss", lambda: [rnd.randrange(3, 500) for _ in range(args.prompt_tokens)])):
        engine.step_times.reset()
        wave(name, prompt, args.max_tokens)
        engine.run_until_idle()
        results[name] = engine.step_times.summary()
    engine.close()
    hit, miss = results["hit"], results["miss"]
    decode = hit["decode_eager"]
    return {"c": c, "hit_schedule_ms": hit["prefill_or_mixed"]["schedule_ms"],
            "miss_schedule_ms": miss["prefill_or_mixed"]["schedule_ms"],
            "miss_prefill_steps": miss["prefill_or_mixed"]["steps"],
            **{f"decode_{p}": decode[f"{p}_ms"] for p in ("schedule", "prepare", "forward", "sample", "emit")},
            "decode_steps": decode["steps"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--num-blocks", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3, help="runs per level; the table shows medians")
    p.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "tritonkv_bench"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    path = random_llama(os.path.join(args.dir, "micro_llama"), MICRO)
    rows = []
    for c in args.concurrency:
        runs = [one_level(path, c, args) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append([c, f"{med['hit_schedule_ms']:.1f}", f"{med['miss_schedule_ms']:.1f}",
                     *(f"{med[f'decode_{p}']:.2f}" for p in ("schedule", "prepare", "forward", "sample", "emit"))])
    lines = [f"# Engine host work per step ({os.cpu_count()} cores, {platform.machine()}, 1 torch thread)", "",
             f"`python bench/host_step_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"A 1-layer hidden-32 Llama on the CPU, a pool of {args.num_blocks} 16-token blocks, "
             f"{args.prompt_tokens}-token prompts, {args.max_tokens} output tokens; medians of {args.repeats} runs, "
             "ms per step (engine/step_times.py). `prefix hit`: the first step of a wave whose prompt the pool "
             "caches (one step for every row); `no hit`: the mean prefill step of a wave of distinct prompts "
             "(8192 tokens a step). Decode: eager steps of c rows.", "",
             *table(["c", "prefix hit: schedule", "no hit: schedule", "decode: schedule", "prepare", "forward",
                     "sample", "emit"], rows, right=tuple(range(8))), ""]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
