"""How many concurrent full-context sequences the KV pool holds with bf16, fp8 and int8 KV:
predicted by the capacity arithmetic (cache/allocate.py: the figures ``tritonkv capacity``
prints), then admitted by a real engine built in-process.

    # the H200 (Llama-3-8B shape, random bf16 weights written once to --synthetic-dir):
    python bench/capacity_h200.py
    # any machine, in seconds (the demo model, an 8 MiB pool, 512-token sequences):
    python bench/capacity_h200.py --tiny

Per KV dtype, in its own process (a clean device):
- predicted = blocks // ceil(context / block_size), blocks = the pool the engine's factory
  sizes (``gpu_memory_utilization`` on CUDA, ``kv_cache_memory_mb`` on CPU);
- admitted: sequence i is a distinct random prompt of context - 3 tokens generating 1 token,
  left open (no END), so it keeps ceil((context - 3) / block_size) blocks (= the predicted
  blocks per sequence unless context mod block_size is 1, 2 or 3). Sequences are added one
  at a time; admitted = how many are held before the next one forces a preemption (the
  engine frees an idle conversation's KV when a new turn needs blocks: memory never fails a
  turn, it queues or preempts);
- together: every admitted sequence then takes one more turn (1 prompt token, 1 generated),
  all submitted at once: the most rows one engine step ran, and whether any was preempted.

Prints a table and writes it to --out (default bench/results/capacity_h200.md on CUDA,
bench/results/capacity_cpu.md on CPU) and the rows to ``<out>.json``; a later run with the same
settings keeps the rows of the KV dtypes it does not measure (``--kv-dtypes bf16`` then
``--kv-dtypes fp8,int8`` builds the same table as one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "backend"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from md_table import table  # noqa: E402

KV_DTYPES = ("bf16", "fp8", "int8")


def engine_config(args, kv: str):
    from tritonkv.config import EngineConfig

    common = dict(checkpoint=args.checkpoint, kv_cache_dtype="auto" if kv == "bf16" else kv, dtype="bfloat16",
                  block_size=args.block_size, max_model_len=args.context, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, enable_cuda_graphs=False,
                  **({} if args.kv_eviction == "none" else
                     dict(kv_eviction=args.kv_eviction, kv_window=args.kv_window, attention_sinks=args.attention_sinks,
                          heavy_hitter_tokens=args.heavy_hitter_tokens)))
    if args.tiny:
        return EngineConfig(device="cpu", kv_cache_memory_mb=args.kv_cache_memory_mb, **common)
    return EngineConfig(device="cuda", gpu_memory_utilization=args.gpu_memory_utilization, **common)


def measure(args, kv: str) -> dict:
    """One KV dtype: the prediction, then the admission run on a real engine."""
    import torch

    from tritonkv.cache.capacity import kv_capacity
    from tritonkv.engine.factory import build_engine, kv_budget_bytes, pick_device
    from tritonkv.engine.requests import SamplingParams
    from tritonkv.model.model_config import ModelConfig

    try:
        config = engine_config(args, kv)
    except ValueError as exc:  # e.g. an 8-bit cache with an eviction policy
        return {"kv": kv, "refused": str(exc)}
    device = pick_device(config.device)
    model_config = ModelConfig.from_checkpoint(args.checkpoint)
    budget = kv_budget_bytes(config, model_config, torch.bfloat16, device)
    predicted = kv_capacity(model_config, config, device.type, budget_bytes=budget, context=args.context).figures()
    budget = budget if budget is not None else config.kv_cache_memory_mb * 2**20

    t0 = time.perf_counter()
    engine = build_engine(config)
    assert engine.pool.num_blocks == predicted["num_blocks"], (engine.pool.num_blocks, predicted["num_blocks"])
    rows_per_step = []
    schedule = engine.scheduler.schedule

    def spy(running, idle):
        plan = schedule(running, idle)
        rows_per_step.append(len(plan))
        return plan

    engine.scheduler.schedule = spy
    rng = random.Random(0)
    vocab = model_config.vocab_size
    errors = []

    def turn(corr_id, ids, start):
        engine.submit(corr_id, ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                      lambda out: out.finished and out.error and errors.append(out.error), start=start, end=False)

    admitted, limit = 0, predicted["sequences_bounded"] + 3
    while admitted < limit:
        turn(admitted, [rng.randrange(vocab) for _ in range(args.context - 3)], start=True)
        engine.run_until_idle()
        if errors:
            raise RuntimeError(errors[0])
        if engine.scheduler.num_preemptions:
            break
        admitted += 1
    fill_s = time.perf_counter() - t0
    held = engine.pool.counts()["used"]
    # all admitted but the preempted ones (the oldest idle) take a turn together
    live = [i for i in range(admitted + 1) if engine._live.get(i) is not None and engine._live[i].seq_id in engine.kv]
    preempted_before = engine.scheduler.num_preemptions
    rows_per_step.clear()
    for i in live:
        turn(i, [rng.randrange(vocab)], start=False)
    engine.run_until_idle()
    if errors:
        raise RuntimeError(errors[0])
    return {"kv": kv, "bytes_per_token": predicted["bytes_per_token"], "budget_bytes": budget,
            "num_blocks": predicted["num_blocks"], "blocks_per_sequence": predicted["blocks_per_sequence_bounded"],
            "predicted": predicted["sequences_bounded"], "admitted": admitted,
            "preempted_at": admitted + 1 if engine.scheduler.num_preemptions else None,
            "blocks_held": held, "together": len(live), "most_rows_in_a_step": max(rows_per_step, default=0),
            "preempted_together": engine.scheduler.num_preemptions - preempted_before, "fill_s": round(fill_s, 1)}


def command_line() -> str:
    """This run's command without --kv-dtypes / --out (the table may merge several runs)."""
    words, skip = ["python", "bench/capacity_h200.py"], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in ("--kv-dtypes", "--out"):
            skip = True
        elif not a.startswith(("--kv-dtypes=", "--out=")):
            words.append(a)
    return " ".join(words)


EVICTION_ARGS = ("kv_eviction", "kv_window", "attention_sinks", "heavy_hitter_tokens")


def eviction_text(args) -> str:
    return ", ".join(f"{k} {getattr(args, k)}" for k in EVICTION_ARGS)


def report(args, results: list[dict], device_name: str) -> str:
    from tritonkv.engine.capacity_report import human_bytes

    gib = 2**30
    lines = [f"# KV capacity: concurrent {args.context:,}-token sequences, predicted and admitted", "",
             f"`{command_line()}` on {device_name}; checkpoint "
             f"{args.checkpoint} ({args.shape}); block_size {args.block_size}, "
             + (f"kv_cache_memory_mb {args.kv_cache_memory_mb}" if args.tiny else
                f"gpu_memory_utilization {args.gpu_memory_utilization}")
             + f", max_num_seqs {args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}, "
             "CUDA graphs off" + (f"; {eviction_text(args)}" if args.kv_eviction != "none" else "") + ".", "",
             ]
    rows = []
    for r in results:
        if "refused" in r:
            rows.append([r["kv"], f"refused: {r['refused']}"] + [""] * 8)
            continue
        rows.append([r["kv"], f"{r['bytes_per_token']:,}", human_bytes(r["budget_bytes"]), f"{r['num_blocks']:,}",
                     r["blocks_per_sequence"], r["predicted"], r["admitted"], f"{r['blocks_held']:,}",
                     r["preempted_at"] or "-",
                     f"{r['together']} / {r['most_rows_in_a_step']} / {r['preempted_together']}"])
    lines += table(["KV dtype", "bytes/token", "KV budget", "blocks", "blocks/sequence", "predicted", "admitted",
                    "blocks held", "preemption at sequence",
                    "together: sequences / most rows in a step / preempted"], rows, right=tuple(range(1, 9)))
    lines += ["", "The same prediction from the command line (the KV budget above, in GiB):", ""]
    bound = "".join(f" --param {k}={getattr(args, k)}" for k in EVICTION_ARGS) if args.kv_eviction != "none" else ""
    for budget in sorted({r["budget_bytes"] for r in results if "budget_bytes" in r}):
        lines.append(f"    tritonkv capacity {args.checkpoint} --memory-gb {budget / gib:.9f} "
                     f"--context {args.context} --param block_size={args.block_size}{bound}")
    lines += ["", "Admitted: distinct random prompts of context - 3 tokens, 1 generated token, left open, "
              "added one at a time until the next one forced a preemption. Together: every held sequence "
              "then took one more 1-token turn, all submitted at once."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the demo model on the CPU (proves the script in seconds)")
    p.add_argument("--shape", default=None, help="synthetic checkpoint shape (default llama3-8b; --tiny: demo)")
    p.add_argument("--synthetic-dir", default="/tmp/tritonkv-synthetic")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default 8192; --tiny 512)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-mb", type=int, default=8, help="the CPU pool (--tiny)")
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the context (one prefill step)")
    p.add_argument("--kv-dtypes", default=",".join(KV_DTYPES))
    p.add_argument("--kv-eviction", default="none", choices=("none", "streaming", "h2o"),
                   help="the engine's eviction policy: predicted and admitted under its per-sequence bound")
    p.add_argument("--kv-window", type=int, default=2048)
    p.add_argument("--attention-sinks", type=int, default=4)
    p.add_argument("--heavy-hitter-tokens", type=int, default=256)
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: measure this dtype, print JSON
    args = p.parse_args()
    args.context = args.context or (512 if args.tiny else 8192)
    args.max_num_batched_tokens = args.max_num_batched_tokens or args.context
    if args.tiny:
        from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

        args.shape, args.checkpoint = "demo", ensure_demo_checkpoint()
    else:
        from synthetic_checkpoint import write_synthetic

        args.shape = args.shape or "llama3-8b"
        args.checkpoint = write_synthetic(args.shape, os.path.join(args.synthetic_dir, args.shape))
        import torch

        if torch.cuda.is_initialized():  # writing the weights used the device: leave it to the children
            torch.cuda.empty_cache()
    if args.one:
        print("RESULT " + json.dumps(measure(args, args.one)), flush=True)
        return 0
    name = ("capacity_cpu" if args.tiny else "capacity_h200") + ("" if args.kv_eviction == "none" else f"_{args.kv_eviction}")
    out = args.out or os.path.join(ROOT, "bench", "results", name + ".md")
    # rows measured by earlier runs with the same settings (e.g. one KV dtype per run) are kept
    settings = {k: v for k, v in vars(args).items() if k not in ("kv_dtypes", "out", "one")}
    saved = {}
    if os.path.exists(out + ".json"):
        with open(out + ".json") as f:
            previous = json.load(f)
        if previous.get("settings") == settings:
            saved = previous["results"]
    for kv in args.kv_dtypes.split(","):
        if kv not in KV_DTYPES:
            p.error(f"--kv-dtypes: {kv!r} is not one of {KV_DTYPES}")
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--one", kv],
                               capture_output=True, text=True)
        found = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode or not found:
            sys.stderr.write(child.stdout[-3000:] + child.stderr[-3000:])
            print(f"{kv}: the measuring process failed (exit {child.returncode})", file=sys.stderr)
            return 1
        saved[kv] = json.loads(found[-1][len("RESULT "):])
        print(json.dumps(saved[kv]), flush=True)
        with open(out + ".json", "w") as f:
            json.dump({"settings": settings, "results": saved}, f, indent=1)
    results = [saved[kv] for kv in KV_DTYPES if kv in saved]
    if args.tiny:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    else:
        import torch

        device_name = torch.cuda.get_device_name(0)
    text = report(args, results, device_name)
    print(text)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
