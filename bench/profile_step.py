"""Where one decode step's time goes, on the synthetic Llama-3-8B shape (or any
bench/synthetic_checkpoint.py shape):

1. (CUDA) eager steps under torch.profiler: kernel time per step grouped by kernel family,
   beside the graph replay time (graph replay runs the same kernels without launch gaps);
2. served-like steps (decode graphs and overlap, as the engine runs them): wall ms per step,
   the host ms per step by phase (schedule, prepare = inputs, forward and sample launches,
   emit), the runner's host-to-device input copies per step, and (CUDA) every memcpy the
   profiler sees per step and the time per step spent outside the graph (wall - replay).

    python bench/profile_step.py [--batch 1 64] [--ctx 200] [--steps 5] [--serve-steps 200]
    python bench/profile_step.py --device cpu --shape llama-tiny --batch 1 64   # host costs only
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(HERE), "backend"), HERE]

import torch  # noqa: E402

from synthetic_checkpoint import write_synthetic  # noqa: E402
from tritonkv.config import EngineConfig  # noqa: E402
from tritonkv.engine.factory import build_engine  # noqa: E402
from tritonkv.engine.requests import SamplingParams  # noqa: E402


def family(name: str) -> str:
    n = name.lower()
    for key, fam in (("splitkreduce", "gemm"), ("gemm", "gemm"), ("gemv", "gemm"), ("cutlass", "gemm"), ("nvjet", "gemm"), ("sm90", "gemm"),
                     ("_skinny", "gemm"), ("_split_sum", "gemm"),
                     ("_decode", "attention"), ("_reduce", "attention"), ("kv_write", "kv_write"),
                     ("_write_kv", "kv_write"), ("rms_norm", "rms_norm"), ("silu", "silu_mul"),
                     ("rotary", "rotary"), ("argmax", "sample"), ("reduce_kernel", "sample"),
                     ("index", "gather/copy"), ("copy", "gather/copy"), ("elementwise", "elementwise")):
        if key in n:
            return fam
    return "other:" + name[:60]


def submit(engine, b, ctx, max_tokens, tag):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(b):
        engine.submit((tag, b, i), [(i * 7 + j) % 1000 + 5 for j in range(ctx)], params, lambda out: None,
                      start=True, end=True, stateless=True)
    engine._drain()


def eager_breakdown(engine, b, args) -> None:
    """Kernel time per eager decode step by family, and the replay time of the step's graph."""
    submit(engine, b, args.ctx, args.steps + 3, "eager")
    graphs = engine.runner.graphs
    engine.runner.graphs = {}  # eager steps: the profiler names every kernel
    engine.step()  # prefill
    engine.step()  # first decode (warm)
    if engine._pending is not None:
        engine._finalize(engine._pending)
        engine._pending = None
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    engine.runner.graphs = graphs
    graph, _ = graphs[engine.runner._graph_key(b, args.ctx + 2)]
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(20):
        graph.replay()
    stop.record()
    stop.synchronize()
    replay_ms = start.elapsed_time(stop) / 20
    engine.run_until_idle()
    per_family, count = per_step_kernels(prof, args.steps)
    total = sum(per_family.values())
    print(f"\n## batch {b}, context ~{args.ctx}: GPU kernel time per eager decode step {total / 1000:.3f} ms; "
          f"graph replay {replay_ms:.3f} ms (blas {args.blas or 'default'}{', skinny gemm' if args.skinny else ''})")
    print("| family | us / step | kernels / step | share |\n|---|---:|---:|---:|")
    for f, t in per_family.most_common(10):
        print(f"| {f} | {t:.0f} | {count[f]:.0f} | {t / total:.1%} |")
    return replay_ms


def per_step_kernels(prof, steps):
    per_family, count = collections.Counter(), collections.Counter()
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA or getattr(ev, "device_time_total", 0):
            t = getattr(ev, "device_time_total", None) or ev.cuda_time_total
            f = family(ev.key)
            per_family[f] += t / steps
            count[f] += ev.count / steps
    return per_family, count


def served_steps(engine, b, args, replay_ms) -> None:
    """Decode steps as served (graphs, overlap): wall and host ms per step, copies per step."""
    cuda = engine.device.type == "cuda"
    warm = 5
    submit(engine, b, args.ctx, warm + args.serve_steps + 20 + 5, "served")
    for _ in range(warm):  # prefill and the first decode steps
        engine.step()
    kind = "decode_graph" if engine.runner.graphs else "decode_eager"
    copies = collections.Counter()
    if cuda:  # which copies a step makes (a short profiled run; the timed run is not profiled)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                engine.step()
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.key.startswith("Memcpy"):
                copies[ev.key.split(" (")[0]] += ev.count / 20
    engine.step_times.reset()
    inputs = getattr(engine.runner, "inputs", None)  # (a runner before the packed inputs has none)
    uploads0 = inputs.h2d_copies if inputs else 0
    t0 = time.perf_counter()
    for _ in range(args.serve_steps):
        engine.step()
    wall_ms = (time.perf_counter() - t0) * 1000 / args.serve_steps
    s = engine.step_times.summary().get(kind)
    engine.run_until_idle()
    if s is None:
        print(f"\n(batch {b}: no {kind} steps measured)")
        return
    uploads = f"{(inputs.h2d_copies - uploads0) / args.serve_steps:.2f}" if inputs else "n/a"
    host = s["schedule_ms"] + s["prepare_ms"] + s["forward_ms"] + s["sample_ms"] + s["emit_ms"]
    print(f"\n## batch {b}, served-like decode steps ({kind}, overlap {'on' if engine.runner.graphs else 'off'}), "
          f"{args.serve_steps} steps on {engine.device.type}")
    print(f"- wall {wall_ms:.3f} ms / step ({1000 * b / wall_ms:.1f} tok/s)"
          + (f"; graph replay {replay_ms:.3f} ms: {wall_ms - replay_ms:.3f} ms / step outside the graph"
             if replay_ms else ""))
    print(f"- host {host:.3f} ms / step: schedule {s['schedule_ms']:.3f}, prepare {s['prepare_ms']:.3f}, "
          f"forward launch {s['forward_ms']:.3f}, sample launch {s['sample_ms']:.3f}, emit {s['emit_ms']:.3f} "
          f"(wait for the GPU {s['wait_ms']:.3f})")
    print(f"- runner input copies host->device per step: {uploads}"
          + ("".join(f"; profiler {k} per step: {v:.2f}" for k, v in sorted(copies.items())) if cuda else
             " (CPU: the device buffer is the host buffer, nothing is copied)"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--ctx", type=int, default=200)
    ap.add_argument("--steps", type=int, default=5, help="profiled eager steps (CUDA)")
    ap.add_argument("--serve-steps", type=int, default=200, help="timed served-like steps")
    ap.add_argument("--blas", default="", help="torch.backends.cuda.preferred_blas_library (cublas / cublaslt)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--shape", default=None, help="bench/synthetic_checkpoint.py shape (llama3-8b; cpu: llama-tiny)")
    ap.add_argument("--skinny", action="store_true", help="EngineConfig.skinny_gemm on (kernels/skinny_gemm_table.py; the engine's "
                    "default since 89c9a16); without it the profile measures torch (cuBLASLt) GEMMs alone")
    args = ap.parse_args()
    print("Command: `" + " ".join(["python bench/profile_step.py", *sys.argv[1:]]) + "`", flush=True)
    cuda = args.device == "cuda"
    shape = args.shape or ("llama3-8b" if cuda else "llama-tiny")
    ckpt = write_synthetic(shape, f"/tmp/tritonkv-synthetic/{shape}")
    engine = build_engine(EngineConfig(checkpoint=ckpt, dtype="bfloat16" if cuda else "float32", device=args.device,
                                       kv_cache_memory_mb=20000 if cuda else 512, max_num_seqs=max(args.batch),
                                       max_num_batched_tokens=8192, skinny_gemm=args.skinny))
    if cuda and args.blas:  # after build_engine, which prefers cuBLASLt
        torch.backends.cuda.preferred_blas_library(args.blas)
    print(f"shape {shape} on {torch.cuda.get_device_name(0) if cuda else 'cpu'}, torch {torch.__version__}")
    for b in args.batch:
        replay_ms = eager_breakdown(engine, b, args) if cuda else None
        served_steps(engine, b, args, replay_ms)


if __name__ == "__main__":
    main()
