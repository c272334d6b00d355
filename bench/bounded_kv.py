"""Bounded KV memory (issue 14): blocks held vs tokens generated, and decode speed, for each
eviction policy: none / window (a sliding-window model) / streaming / h2o.

Part 1, one long greedy stream per policy: the blocks the sequence holds after every step
(plot + table). Part 2, decode tok/s at concurrency c (default 16): each policy streams with
its kept cache at about ``K`` tokens (the prompt is longer than the window, so eviction runs
through the whole decode); ``none`` is measured at the same mean context (prompt ``K - N/2``,
``N`` new tokens), so the difference is what the policy's machinery costs (re-rotating keys,
returning blocks, h2o's attention mass), not a shorter context. Decode tok/s: tokens per
second over the steps after every sequence has its first token (prefill left out).

CPU (a small random Llama / Mistral written here; results in bench/results/bounded_kv.md):
    OMP_NUM_THREADS=1 python bench/bounded_kv.py
GPU (Llama-3-8B shape, random bf16 weights; the window model is the same weights as Mistral):
    python bench/bounded_kv.py --device cuda --shape llama3-8b --out bench/results/bounded_kv_h200.md
Only some policies, no blocks-held stream (the quick check of one policy's decode cost):
    python bench/bounded_kv.py --device cuda --shape llama3-8b --policies none,h2o --stream 0 --repeats 1

Rules: ``none`` is measured at each policy's *mean* kept context over the timed decode (sinks
+ heavy hitters + the recent window, which grows by up to ``kv_window_stride`` tokens between
evictions), computed from the policy itself (``mean_context``). The decode steps' host/GPU
split (engine/step_times.py, last repeat) is printed per entry: with overlap, ``wait`` is
the host blocked on the GPU (GPU-bound while > 0), the host phases run under the GPU's step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "backend"), os.path.join(ROOT, "bench")]

from tritonkv.cache.eviction.choose import policy_for  # noqa: E402
from tritonkv.config import EngineConfig  # noqa: E402
from tritonkv.engine.factory import build_engine  # noqa: E402
from tritonkv.engine.requests import SamplingParams  # noqa: E402

SMALL = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=16384, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.05)
POLICIES = ("none", "window", "streaming", "h2o")


def small_checkpoints(directory: str, window: int) -> dict[str, str]:
    """A random Llama and the same weights as a Mistral with ``sliding_window``."""
    from synthetic_checkpoint import random_llama

    paths = {"llama": random_llama(os.path.join(directory, "llama"), SMALL),
             "mistral": os.path.join(directory, "mistral")}
    _window_twin(paths["llama"], paths["mistral"], window)
    return paths


def _window_twin(llama: str, mistral: str, window: int) -> None:
    """``mistral``: config.json of ``llama`` as a MistralForCausalLM with ``sliding_window``;
    the weight files are links (Llama and Mistral share parameter names)."""
    os.makedirs(mistral, exist_ok=True)
    with open(os.path.join(llama, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=window)
    with open(os.path.join(mistral, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for name in os.listdir(llama):
        if name.endswith((".safetensors", ".json")) and name != "config.json":
            dst = os.path.join(mistral, name)
            if not os.path.exists(dst):
                os.symlink(os.path.join(os.path.abspath(llama), name), dst)


def engine_for(policy: str, paths: dict, args, **overrides):
    settings = dict(checkpoint=paths["mistral" if policy == "window" else "llama"], device=args.device,
                    dtype=args.dtype, block_size=args.block_size, max_num_seqs=max(args.concurrency, 1),
                    max_num_batched_tokens=args.batch_tokens)
    if policy in ("streaming", "h2o"):
        settings.update(kv_eviction=policy, kv_window=args.window, attention_sinks=args.sinks,
                        kv_window_stride=args.stride)
    if policy == "h2o":
        settings.update(heavy_hitter_tokens=args.heavy)
    settings.update(overrides)
    return build_engine(EngineConfig(**settings))


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


def blocks_held_curve(engine, args, vocab: int) -> list[int]:
    """Pool blocks the one sequence holds after each generated token (streaming / h2o: the
    table plus the written originals of re-rotated blocks)."""
    out = []
    engine.submit("s", prompt(args.prompt, 0, vocab), SamplingParams(max_tokens=args.stream, temperature=0.0,
                                                                     ignore_eos=True), out.append,
                  start=True, end=True)
    held = []
    while True:
        engine._drain()
        seqs = list(engine._seqs.values())
        if not seqs:
            break
        engine.step()
        generated = sum(len(o.token_ids) for o in out)
        if generated > len(held):  # (after the last token the sequence is released: as before)
            now = engine.kv.held_blocks(seqs[0].seq_id) if seqs[0].seq_id in engine.kv else held[-1]
            held += [now] * (generated - len(held))
    engine.run_until_idle()
    return held


def timed_decode(engine, prompts: list[list[int]], max_tokens: int) -> float:
    """Decode tok/s of one batch: the steps after every sequence has its first token (the
    prefill, and steps mixing it with decode, are left out). ``engine.step_times`` then holds
    those steps only."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        engine.submit(("b", i, id(outs)), p, params, outs[i].append, start=True, end=True)
    engine._drain()
    while not all(outs):
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    before = sum(len(o.token_ids) for out in outs for o in out)
    engine.step_times.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    engine.run_until_idle()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(o.token_ids) for out in outs for o in out) - before
    # CPU: tokens per second of this process's CPU time (one intra-op thread), which other
    # processes on a shared machine do not inflate; CUDA: wall time (the GPU is the bound)
    return tokens / (wall if engine.device.type == "cuda" else cpu)


def kept_context(policy: str, args) -> int:
    """Tokens a full kept cache holds at least: window (+ sinks block, + heavy hitters)."""
    kept = args.window + (args.block_size if policy != "window" else 0)
    return kept + (args.heavy if policy == "h2o" else 0)


def policy_prompt(policy: str, args) -> int:
    """A prompt past the policy's window: blocks are returned all through the decode."""
    return 2 * kept_context(policy, args) + args.block_size


def mean_context(policy: str, args) -> int:
    """Mean keys a decode query of ``policy`` attends over the timed decode: the window model
    its window; streaming / h2o the kept cache (sinks, heavy hitters, and the recent window
    from ``window_start``, which moves ``kv_window_stride`` tokens at a time)."""
    if policy == "window":
        return args.window
    pol = policy_for(EngineConfig(block_size=args.block_size, kv_eviction=policy, kv_window=args.window,
                                  attention_sinks=args.sinks, heavy_hitter_tokens=args.heavy,
                                  kv_window_stride=args.stride))
    fixed = (pol.sink_blocks + pol.heavy_blocks) * args.block_size
    start = policy_prompt(policy, args)
    lens = [fixed + p + 1 - pol.window_start(p) * args.block_size
            for p in range(start, start + args.decode_tokens)]
    return round(sum(lens) / len(lens))


def speed_plan(args) -> list[tuple[str, int, object]]:
    """(policy, prompt tokens, result key) of every decode-speed run. A policy's prompt is past
    its window; ``none`` runs at each policy's mean context (``mean - n / 2`` .. ``mean + n / 2``)."""
    n = args.decode_tokens
    none_at = sorted({mean_context(p, args) for p in args.policies if p != "none"})
    plan = [("none", max(k - n // 2, 8), ("none", k)) for k in none_at]
    return plan + [(p, policy_prompt(p, args), p) for p in args.policies if p != "none"]


def measure(engines: dict, plan, args, vocab: int) -> dict:
    """Median decode tok/s per plan entry; repeats go round-robin over the entries, so that a
    slow spell of a shared machine hits every entry alike."""
    samples = {key: [] for _, _, key in plan}
    breakdown = {}
    prompts = {key: [prompt(length, 100 + i, vocab) for i in range(args.concurrency)] for _, length, key in plan}
    for p, _, key in plan:
        timed_decode(engines[p], prompts[key][:2], 4)  # warm-up (kernels, allocator)
    for _ in range(args.repeats):
        for p, _, key in plan:
            samples[key].append(timed_decode(engines[p], prompts[key], args.decode_tokens))
            breakdown[key] = engines[p].step_times.summary()
    return {key: statistics.median(v) for key, v in samples.items()}, breakdown


def evicted(engine) -> int:
    stats = engine.stats()
    return sum(stats[f"evicted_blocks_{m}"] for m in ("window", "streaming", "h2o"))


def run_all(paths: dict, args, vocab: int) -> tuple[dict, dict, dict]:
    """Blocks-held curves, decode speeds and blocks returned, per policy. CPU: every engine
    at once (measurements interleaved); CUDA: one engine (weights + pool) at a time."""
    plan = speed_plan(args)
    curves, speeds, returned, breakdown = {}, {}, {}, {}
    groups = [tuple(args.policies)] if args.device == "cpu" else [(p,) for p in args.policies]
    for group in groups:
        engines = {p: engine_for(p, paths, args, kv_cache_memory_mb=args.kv_mb) for p in group}
        for p, engine in engines.items():
            curves[p] = blocks_held_curve(engine, args, vocab) if args.stream else []
        got, steps = measure(engines, [e for e in plan if e[0] in group], args, vocab)
        speeds.update(got)
        breakdown.update(steps)
        for p, engine in engines.items():
            returned[p] = evicted(engine)
            engine.close()
        del engines, engine
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the next policy's engine loads its own weights and pool
    return curves, speeds, returned, breakdown


def plot(curves: dict, path: str, block_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for policy, held in curves.items():
        ax.plot(range(1, len(held) + 1), held, label=policy)
    ax.set_xlabel("tokens generated")
    ax.set_ylabel(f"KV blocks held ({block_size} tokens each)")
    ax.set_title("One stream: KV blocks held per eviction policy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--shape", default="small", help="small (written here) or a bench/synthetic_checkpoint.py shape")
    ap.add_argument("--dir", default=os.path.join(ROOT, "tmp", "bounded_kv"), help="checkpoints go here")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=None, help="kv_window and the window model's window")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--heavy", type=int, default=None, help="h2o heavy_hitter_tokens")
    ap.add_argument("--stride", type=int, default=None, help="kv_window_stride (default: window / 8)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt of the long stream")
    ap.add_argument("--stream", type=int, default=None, help="tokens of the long stream (0: no stream, no plot)")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="comma-separated subset of none,window,streaming,h2o (none is always run: the baseline)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--batch-tokens", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-mb", type=int, default=None, help="KV pool (MB)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bounded_kv.md"))
    args = ap.parse_args()
    gpu = args.device == "cuda"
    args.dtype = "bfloat16" if gpu else "float32"
    args.window = args.window or (2048 if gpu else 256)
    args.heavy = args.heavy or args.window // 4
    args.stride = args.window // 8 if args.stride is None else args.stride
    args.stream = (4096 if gpu else 2048) if args.stream is None else args.stream
    chosen = [p.strip() for p in args.policies.split(",") if p.strip()]
    if any(p not in POLICIES for p in chosen):
        ap.error(f"--policies: choose from {', '.join(POLICIES)}")
    args.policies = [p for p in POLICIES if p in chosen or p == "none"]
    args.decode_tokens = args.decode_tokens or (256 if gpu else 64)
    args.kv_mb = args.kv_mb or (40_000 if gpu else 512)
    if args.shape == "small":
        paths = small_checkpoints(os.path.join(args.dir, "small"), args.window)
        vocab = SMALL["vocab_size"]
    else:
        from synthetic_checkpoint import SHAPES, write_synthetic

        llama = write_synthetic(args.shape, os.path.join(args.dir, args.shape))
        paths = {"llama": llama, "mistral": llama + "-window"}
        _window_twin(llama, paths["mistral"], args.window)
        vocab = SHAPES[args.shape]["vocab_size"]

    curves, speeds, returned, breakdown = run_all(paths, args, vocab)
    png = os.path.splitext(args.out)[0] + ".png"
    if args.stream:
        plot(curves, png, args.block_size)

    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores, shared)"
    marks = [1, 256, 512, 1024, 2048, 4096, 8192, 16384]
    marks = [m for m in marks if m <= args.stream] + ([args.stream] if args.stream not in marks else [])
    lines = [
        f"# Bounded KV: blocks held and decode speed per eviction policy ({args.shape}, {device})",
        "",
        "`" + " ".join(([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if os.environ.get("OMP_NUM_THREADS")
                        else []) + ["python bench/bounded_kv.py", *sys.argv[1:]]) + "`",
        "",
        f"Window {args.window} tokens (the window model's `sliding_window` and `kv_window`), "
        f"{args.sinks} attention sinks, h2o heavy hitters {args.heavy} tokens, `kv_window_stride` "
        f"{args.stride}, block {args.block_size} tokens.",
    ]
    if args.stream:
        lines += [
            "",
            f"## Blocks held by one stream ({args.prompt}-token prompt, greedy), plot: "
            f"[{os.path.basename(png)}]({os.path.basename(png)})",
            "",
            "| tokens generated | " + " | ".join(args.policies) + " |",
            "|---|" + "---|" * len(args.policies),
        ]
        for m in marks:
            lines.append(f"| {m} | " + " | ".join(str(curves[p][m - 1]) for p in args.policies) + " |")
    lines += [
        "",
        f"## Decode speed, {args.concurrency} concurrent sequences, {args.decode_tokens} new tokens each "
        f"(median of {args.repeats})",
        "",
        "Eviction policies run with their kept cache full (prompt past the window: blocks are returned "
        "throughout); `none` runs at the same mean context, so the last column is what the policy's "
        "machinery costs. " + ("Wall time." if gpu else "CPU: tokens per second of the process's CPU "
                               "time with one intra-op thread (OMP_NUM_THREADS=1), robust on a shared machine."),
        "",
        "| policy | prompt tokens | kept context | decode tok/s | `none` at that mean context | cost |",
        "|---|---|---|---|---|---|",
    ]
    for p, length, key in speed_plan(args):
        if p == "none":
            k = key[1]
            lines.append(f"| none | {length} | {length}..{length + args.decode_tokens} | {speeds[key]:,.0f} | | |")
            continue
        k = mean_context(p, args)
        base = speeds[("none", k)]
        lines.append(f"| {p} | {length} | ~{k} (mean) | {speeds[p]:,.0f} | {base:,.0f} | "
                     f"{(1 - speeds[p] / base) * 100:+.1f}% |")
    lines += ["", "Blocks returned to the pool over the whole run (stream + speed runs): " +
              ", ".join(f"{p} {returned[p]:,}" for p in args.policies) + "."]
    lines += ["", "Decode steps of the last repeat (engine/step_times.py), ms per step: host phases "
              "(schedule, prepare, forward launch, sample launch, emit) and wait (host blocked on "
              "the GPU; > 0: GPU-bound). Kinds: decode_graph (replayed), decode_eager, prefill_or_mixed.",
              "", "| entry | kind | steps | host ms | wait ms | total ms |", "|---|---|---|---|---|---|"]
    for p, length, key in speed_plan(args):
        name = f"none @ {key[1]}" if p == "none" else p
        for kind, v in sorted(breakdown.get(key, {}).items()):
            host = v["total_ms"] - v["wait_ms"]
            lines.append(f"| {name} | {kind} | {v['steps']} | {host:.2f} | {v['wait_ms']:.2f} | {v['total_ms']:.2f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
