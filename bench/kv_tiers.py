"""KV host tier (issue 25): host restore vs recompute.

Part 1, a returning conversation: conversation X holds ``--history`` tokens, goes idle, a
filler conversation takes the whole device pool (X is swapped to the host tier, or with the
tier off preempted and its cached blocks evicted), then X's next turn (``--new`` tokens,
one output token) arrives: its TTFT, host tier on vs off (same engine settings otherwise).

Part 2, a multi-turn workload with ``--oversubscribe`` x more live conversations than the
device pool holds at ``--turn-history`` tokens each: every conversation runs ``--turns``
turns; turns arrive in waves of ``--concurrency`` conversations (round robin, so between two
turns of a conversation every other conversation runs one: the think time). Per turn TTFT
p50 / p90 and output tok/s, tier on vs off. Two shapes of history: the default, one long first
turn (``--turn-history`` 2048) and short returning turns (``--new`` 64), where a quarter of the
turns are first-turn prefills that no tier shortens; and growing histories, ``--turn-history 512
--new 512`` (each turn adds 512 tokens, ~2.1k at the 4th, a chat's pattern), where each
returning turn recomputes its whole history with the tier off.

GPU (Llama-3-8B shape, random bf16 weights, bench/synthetic_checkpoint.py; 8B bf16 takes 2 MiB
per 16-token block: part 2's defaults hold 32 conversations of ~2.4k tokens on the device
(~9.5 GiB) and park the other 96 in a 32 GiB host tier):
    python bench/kv_tiers.py --device cuda --shape llama3-8b --out bench/results/kv_tiers_h200.md
The issue's 256 x 4 turns: add --pool-conversations 64 --host-gb 64 (needs ~60 GiB of free RAM).
CPU smoke test (a tiny random Llama, seconds):
    python bench/kv_tiers.py --shape tiny
Part 3, the decode step with no swap pending (target: tier on within 2% of off): ``--concurrency``
sequences of 128-token prompts decode ``--decode-tokens`` tokens in a pool that holds them
all; output tok/s over the whole run (prefill included, the same in both), best of
``--repeats``.

Part 4, a restore beside decoding rows (issue 25: "overlapped with other rows' decode"):
``--concurrency`` sequences decode while conversation X (``--history`` tokens, parked on the
host as in part 1) returns; the decoding rows' longest gap between two tokens around the
restore and X's TTFT, with the restore overlapped (the scheduler runs X once its copies
landed) and waited (X computed in its swap-in step, every row waiting for the copies: the
scheduler's ``_overlap_restores`` replaced here by the rule before the overlap).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "backend"), os.path.join(ROOT, "bench")]

from tritonkv.config import EngineConfig  # noqa: E402
from tritonkv.engine.factory import build_engine  # noqa: E402
from tritonkv.engine.requests import SamplingParams  # noqa: E402
from tritonkv.engine.step_times import PHASES  # noqa: E402
from md_table import publish, table  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.05)


def checkpoint(shape: str, directory: str) -> str:
    from synthetic_checkpoint import random_llama, write_synthetic

    if shape == "tiny":
        return random_llama(os.path.join(directory, "tiny"), TINY)

    return write_synthetic(shape, os.path.join(directory, shape))


def tokens(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 1, (n,), generator=g).tolist()


class Turn:
    """One submitted turn: its TTFT and tokens (the engine thread is this one: run_until_idle)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.first = None
        self.count = 0
        self.done = False

    def __call__(self, out):
        if out.token_ids and self.first is None:
            self.first = time.perf_counter() - self.t0
        self.count += len(out.token_ids)
        self.done = self.done or out.finished
        if out.error:
            raise RuntimeError(out.error)


def submit(engine, corr, ids, max_tokens, start, end=False) -> Turn:
    t = Turn()
    engine.submit(corr, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), t,
                  start=start, end=end)
    return t


def make(args, path, host_gb, num_blocks):
    cfg = EngineConfig(checkpoint=path, device=args.device, block_size=args.block_size, num_blocks=num_blocks,
                       max_num_batched_tokens=args.chunk, max_num_seqs=args.max_num_seqs, kv_host_memory_gb=host_gb,
                       enable_cuda_graphs=args.device == "cuda", kv_cache_dtype=args.kv_cache_dtype)
    return build_engine(cfg)


def park(engine, args, num_blocks: int, seed: int, vocab: int) -> str:
    """Conversation ``x<seed>`` computes ``args.history`` tokens and goes idle, then filler
    conversations, running together, take the whole device pool (x is swapped to the host tier,
    or with the tier off preempted and its cached blocks evicted); each filler stays within
    the model's positions (a pool larger than one conversation gets several). Returns x's name."""
    x = f"x{seed}"
    submit(engine, x, tokens(args.history, seed, vocab), 1, start=True)
    engine.run_until_idle()
    left = (num_blocks - 2) * args.block_size
    longest = (engine.max_model_len - 1) // args.block_size * args.block_size  # + its one output token
    fillers = []
    while left > 0:
        n = min(left, longest)
        fillers.append(submit(engine, f"fill{seed}-{len(fillers)}", tokens(n, 1000 + 97 * len(fillers) + seed, vocab),
                              1, start=True, end=True))
        left -= n
    engine.run_until_idle()
    return x


def returning_ttft(args, path, host_gb) -> dict:
    bs = args.block_size
    num_blocks = -(-(args.history + args.new + 16) // bs) + 4
    engine = make(args, path, host_gb, num_blocks)
    vocab = engine.model_config.vocab_size
    ttfts, warm = [], 1
    for r in range(warm + args.repeats):
        x = park(engine, args, num_blocks, r, vocab)
        if args.device == "cuda":
            torch.cuda.synchronize()
        engine.step_times.reset()
        t = submit(engine, x, tokens(args.new, 2000 + r, vocab), 1, start=False, end=True)
        engine.run_until_idle()
        if r >= warm:
            ttfts.append(t.first)
    steps = engine.step_times.summary()  # the last returning turn's steps, by kind
    stats = engine.stats()
    result = {"ttft_ms": 1000 * statistics.median(ttfts), "ttfts_ms": [round(1000 * x, 2) for x in ttfts],
              "swap_in_blocks": stats["swap_in_blocks"], "swap_in_bytes": stats["swap_in_bytes"],
              "taken_back_blocks": stats["swap_in_device_hit_blocks"],
              "preemptions": stats["preemptions"], "steps": steps}
    if host_gb:
        result["breakdown"] = restore_breakdown(args, engine, -(-(args.history + 1) // bs), vocab)
    engine.close()
    return result


def timed_ms(fn, cuda: bool, repeats: int) -> float:
    """Median wall ms of ``fn`` with the device idle before and after each call."""
    runs = []
    for _ in range(1 + repeats):  # the first call warms up (allocations)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
    return 1000 * statistics.median(runs[1:])


def restore_breakdown(args, engine, blocks: int, vocab: int) -> dict:
    """Where a restore's TTFT goes, on the engine that measured it (after its runs; it is closed
    next, so its device blocks may be overwritten): the returning turn with the history still on
    the device (prefill of the new tokens, no copy), the swapper's copies of the history's
    blocks (host -> device; and with as many device -> host beside them, as when the pool makes
    room), and one pinned copy of the same bytes (the link's floor)."""
    from tritonkv.cache.tier_moves import SwapPlan

    cuda = args.device == "cuda"
    resident = []
    for r in range(1 + args.repeats):
        x = f"resident{r}"
        submit(engine, x, tokens(args.history, 5000 + r, vocab), 1, start=True)
        engine.run_until_idle()
        t = submit(engine, x, tokens(args.new, 6000 + r, vocab), 1, start=False, end=True)
        engine.run_until_idle()
        if r:
            resident.append(t.first)
    swapper = engine.swapper
    ids = list(range(blocks))
    copy_in = timed_ms(lambda: swapper.run(SwapPlan(in_host=ids, in_device=ids)), cuda, args.repeats)
    out_ids = list(range(blocks, 2 * blocks))
    both = timed_ms(lambda: swapper.run(SwapPlan(out_device=ids, out_host=out_ids, in_host=ids, in_device=ids)),
                    cuda, args.repeats)
    nbytes = blocks * swapper.block_bytes
    src = torch.empty(nbytes, dtype=torch.uint8)
    if cuda:
        src = src.pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=engine.device)
    floor = timed_ms(lambda: dst.copy_(src, non_blocking=True), cuda, args.repeats)
    return {"blocks": blocks, "bytes": nbytes, "resident_ttft_ms": 1000 * statistics.median(resident),
            "swap_in_ms": copy_in, "swap_in_out_ms": both, "pinned_copy_ms": floor}


def workload(args, path, host_gb) -> dict:
    bs = args.block_size
    per_conv = -(-(args.turn_history + args.turns * (args.new + args.output)) // bs)
    num_blocks = args.pool_conversations * per_conv
    conversations = max(1, int(args.oversubscribe * args.pool_conversations))
    engine = make(args, path, host_gb, num_blocks)
    vocab = engine.model_config.vocab_size
    ttfts, returning, out_tokens = [], [], 0  # returning: turns after the first (the tier's)
    t0 = time.perf_counter()
    for turn in range(args.turns):
        for w in range(0, conversations, args.concurrency):
            wave = []
            for c in range(w, min(w + args.concurrency, conversations)):
                n = args.turn_history if turn == 0 else args.new
                wave.append(submit(engine, f"c{c}", tokens(n, 7919 * c + turn, vocab), args.output,
                                   start=turn == 0, end=turn == args.turns - 1))
            engine.run_until_idle()
            ttfts += [t.first for t in wave]
            if turn:
                returning += [t.first for t in wave]
            out_tokens += sum(t.count for t in wave)
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    stats = engine.stats()
    engine.close()
    q, qr = statistics.quantiles(ttfts, n=10), statistics.quantiles(returning, n=10)
    return {"conversations": conversations, "pool_blocks": num_blocks, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p90_ms": 1000 * q[8], "returning_p50_ms": 1000 * statistics.median(returning),
            "returning_p90_ms": 1000 * qr[8], "output_tok_s": out_tokens / elapsed, "swap_ins": stats["swap_ins"],
            "preemptions": stats["preemptions"], "host_dropped_blocks": stats["host_dropped_blocks"]}


def decode_speed(args, path, host_gb) -> float:
    bs = args.block_size
    num_blocks = args.concurrency * (-(-(128 + args.decode_tokens) // bs) + 1)
    engine = make(args, path, host_gb, num_blocks)
    vocab = engine.model_config.vocab_size
    best = 0.0
    for r in range(1 + args.repeats):  # the first run warms up
        t0 = time.perf_counter()
        turns = [submit(engine, f"d{r}-{c}", tokens(128, 31 * c + r, vocab), args.decode_tokens, start=True, end=True)
                 for c in range(args.concurrency)]
        engine.run_until_idle()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if r:
            best = max(best, sum(t.count for t in turns) / (time.perf_counter() - t0))
    assert engine.stats()["swap_outs"] == 0 and engine.stats()["preemptions"] == 0
    engine.close()
    return best


def restore_beside_decode(args, path, host_gb, overlap: bool) -> dict:
    import types

    bs = args.block_size
    rows, decode = args.concurrency, args.decode_tokens
    x_blocks = -(-(args.history + args.new + 16) // bs)
    num_blocks = x_blocks + rows * (-(-(128 + decode) // bs) + 1) + 4
    engine = make(args, path, host_gb, num_blocks)
    if not overlap:
        def waited(self, planned, restored):
            now = [c.seq.seq_id for c in planned if self.kv.restoring(c.seq.seq_id)]
            if now:
                self.kv.restore_now(now)
            return planned
        engine.scheduler._overlap_restores = types.MethodType(waited, engine.scheduler)
    vocab = engine.model_config.vocab_size
    results = []
    for r in range(1 + args.repeats):  # the first run warms up
        x = park(engine, args, num_blocks, 300 + r, vocab)
        assert engine.kv.swapped(engine._live[x].seq_id), "the returning conversation was not parked"
        times: dict[int, list[float]] = {c: [] for c in range(rows)}

        def stamp(c):
            def emit(out):
                if out.token_ids:
                    times[c].append(time.perf_counter())
            return emit

        for c in range(rows):
            engine.submit(f"d{r}-{c}", tokens(128, 500 + 31 * c + r, vocab),
                          SamplingParams(max_tokens=decode, temperature=0.0, ignore_eos=True), stamp(c),
                          start=True, end=True)
        for _ in range(decode // 4):  # the rows decode a while before X returns
            engine._drain()
            engine.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        t_x = time.perf_counter()
        turn = submit(engine, x, tokens(args.new, 600 + r, vocab), 1, start=False, end=True)
        engine.run_until_idle()
        gaps = [b - a for c in range(rows) for a, b in zip(times[c], times[c][1:]) if b > t_x]
        if r:
            results.append({"ttft_ms": 1000 * turn.first, "max_gap_ms": 1000 * max(gaps),
                            "median_gap_ms": 1000 * statistics.median(gaps)})
    engine.close()
    return {k: statistics.median(x[k] for x in results) for k in results[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "llama3-8b", "llama-1b"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "tritonkv_bench"))
    p.add_argument("--host-gb", type=float, default=None, help="host tier when on (default: 32 GiB on CUDA, 1 on CPU)")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=None, help="max_num_batched_tokens (default 8192 / 256 tiny)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--history", type=int, default=None, help="part 1 history tokens (8000; tiny 512)")
    p.add_argument("--new", type=int, default=64, help="new tokens per returning turn")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--turn-history", type=int, default=None, help="part 2 first-turn tokens (2048; tiny 128)")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--output", type=int, default=32, help="part 2 output tokens per turn")
    p.add_argument("--pool-conversations", type=int, default=None,
                   help="conversations the pool holds (32: 128 live conversations at 4x; tiny 4)")
    p.add_argument("--oversubscribe", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=256, help="part 3 tokens per sequence")
    p.add_argument("--parts", default="1,2,3,4", help="which parts, in this order (1,3,4,2: the long one last)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tiny = args.shape == "tiny"
    args.history = args.history or (512 if tiny else 8000)
    args.turn_history = args.turn_history or (128 if tiny else 2048)
    args.chunk = args.chunk or (256 if tiny else 8192)
    args.pool_conversations = args.pool_conversations or (4 if tiny else 32)
    host_gb = args.host_gb or (32.0 if args.device == "cuda" else 1.0)
    path = checkpoint(args.shape, args.dir)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [f"# KV host tier: {args.shape} on {dev}", "", f"`python bench/kv_tiers.py {' '.join(sys.argv[1:])}`", ""]
    for part in args.parts.split(","):  # in the order given; the file is rewritten after each
        lines += PARTS[part](args, path, host_gb)
        publish(lines, args.out)
    return 0


def part_returning(args, path, host_gb) -> list[str]:
    off, on = returning_ttft(args, path, 0), returning_ttft(args, path, host_gb)
    gc.collect()
    lines = [f"## Returning conversation: {args.history} tokens of history, {args.new} new", "",
             "| host tier | TTFT median (ms) | runs (ms) | swap-in blocks (copied) | swap-in bytes | "
             "taken back (still cached on the device) | preemptions |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name, r in (("off (recompute)", off), (f"on ({host_gb} GiB)", on)):
        lines.append(f"| {name} | {r['ttft_ms']:.1f} | {r['ttfts_ms']} | {r['swap_in_blocks']} | "
                     f"{r['swap_in_bytes']:,} | {r['taken_back_blocks']} | {r['preemptions']} |")
    lines += ["", f"restore / recompute TTFT: {on['ttft_ms'] / off['ttft_ms']:.3f} (target <= 0.25)", "",
              "The last returning turn's engine steps (engine/step_times.py: host phases, ms per step; "
              "`wait` is the host blocked on the GPU for the step's token):", "",
              *table(["host tier", "kind", "steps", *PHASES, "total"],
                     [[name, kind, v["steps"], *(f"{v[p + '_ms']:.2f}" for p in PHASES), f"{v['total_ms']:.2f}"]
                      for name, r in (("off", off), ("on", on)) for kind, v in r["steps"].items()],
                     right=tuple(range(2, 4 + len(PHASES)))), ""]
    b = on["breakdown"]
    gbps = lambda ms: f"{b['bytes'] / ms / 1e6:.1f}"  # noqa: E731
    return lines + [
        f"Where the restore goes ({b['blocks']} blocks, {b['bytes']:,} bytes; medians of {args.repeats}, "
        "tier-on engine, device idle before and after each):", "",
        *table(["", "ms", "GB/s"], [
            ["returning turn, history still on the device (no copy)", f"{b['resident_ttft_ms']:.1f}", "-"],
            ["swapper: host -> device", f"{b['swap_in_ms']:.1f}", gbps(b["swap_in_ms"])],
            ["swapper: host -> device and as many device -> host", f"{b['swap_in_out_ms']:.1f}",
             gbps(b["swap_in_out_ms"])],
            ["one pinned host -> device copy of the same bytes (floor)", f"{b['pinned_copy_ms']:.1f}",
             gbps(b["pinned_copy_ms"])]], right=(1, 2)), ""]


def part_workload(args, path, host_gb) -> list[str]:
    off, on = workload(args, path, 0), workload(args, path, host_gb)
    lines = [f"## Multi-turn: {on['conversations']} conversations x {args.turns} turns, pool of "
             f"{on['pool_blocks']} blocks ({args.pool_conversations} conversations), waves of "
             f"{args.concurrency}", "",
             "| host tier | TTFT p50 (ms) | TTFT p90 (ms) | output tok/s | swap-ins | preemptions | dropped |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in (("off (recompute)", off), (f"on ({host_gb} GiB)", on)):
        lines.append(f"| {name} | {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} | {r['output_tok_s']:.1f} | "
                     f"{r['swap_ins']} | {r['preemptions']} | {r['host_dropped_blocks']} |")
    lines += ["", f"TTFT p90 off / on: {off['ttft_p90_ms'] / on['ttft_p90_ms']:.2f} (target >= 3); "
                  f"tok/s on / off: {on['output_tok_s'] / off['output_tok_s']:.2f} (target >= 1)", "",
              f"The same TTFTs without each conversation's first turn (a {args.turn_history}-token prefill, "
              "the same work with the tier on or off), i.e. the turns that return:", "",
              *table(["host tier", "TTFT p50 (ms)", "TTFT p90 (ms)"],
                     [[name, f"{r['returning_p50_ms']:.1f}", f"{r['returning_p90_ms']:.1f}"]
                      for name, r in (("off (recompute)", off), (f"on ({host_gb} GiB)", on))], right=(1, 2))]
    return lines + ["", f"returning turns' TTFT p90 off / on: {off['returning_p90_ms'] / on['returning_p90_ms']:.2f}", ""]


def part_decode(args, path, host_gb) -> list[str]:
    off, on = decode_speed(args, path, 0), decode_speed(args, path, host_gb)
    return [f"## Decode, no swap pending: {args.concurrency} sequences x {args.decode_tokens} tokens", "",
            f"output tok/s: tier off {off:.1f}, on {on:.1f}: on / off {on / off:.3f} (target >= 0.98)", ""]


def part_beside_decode(args, path, host_gb) -> list[str]:
    on, waited = (restore_beside_decode(args, path, host_gb, overlap) for overlap in (True, False))
    return [f"## A {args.history}-token restore while {args.concurrency} sequences decode (medians of "
            f"{args.repeats})", "",
            *table(["restore", "returning turn TTFT (ms)", "decoding rows: longest gap (ms)", "median gap (ms)"],
                   [[name, f"{r['ttft_ms']:.1f}", f"{r['max_gap_ms']:.1f}", f"{r['median_gap_ms']:.1f}"]
                    for name, r in (("overlapped (run once landed)", on), ("waited (same step)", waited))],
                   right=(1, 2, 3)), ""]


PARTS = {"1": part_returning, "2": part_workload, "3": part_decode, "4": part_beside_decode}


if __name__ == "__main__":
    sys.exit(main())
