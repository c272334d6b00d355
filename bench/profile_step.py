"""Where one decode step's GPU time goes: the engine on the synthetic Llama-3-8B shape, eager
steps under torch.profiler, kernel time per step grouped by kernel family, beside the
bytes / bandwidth floor of each GEMM. Graph replay runs the same kernels without launch gaps.

    python bench/profile_step.py [--batch 1 64] [--ctx 200]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

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
                     ("_decode", "attention"), ("_reduce", "attention"), ("kv_write", "kv_write"),
                     ("_write_kv", "kv_write"), ("rms_norm", "rms_norm"), ("silu", "silu_mul"),
                     ("rotary", "rotary"), ("argmax", "sample"), ("reduce_kernel", "sample"),
                     ("index", "gather/copy"), ("copy", "gather/copy"), ("elementwise", "elementwise")):
        if key in n:
            return fam
    return "other:" + name[:60]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--ctx", type=int, default=200)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--blas", default="", help="torch.backends.cuda.preferred_blas_library (cublas / cublaslt)")
    args = ap.parse_args()
    print("Command: `" + " ".join(["python bench/profile_step.py", *sys.argv[1:]]) + "`", flush=True)
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    ckpt = write_synthetic("llama3-8b", "/tmp/tritonkv-synthetic/llama3-8b")
    engine = build_engine(EngineConfig(checkpoint=ckpt, dtype="bfloat16", device="cuda", kv_cache_memory_mb=20000,
                                       max_num_seqs=max(args.batch), max_num_batched_tokens=8192))
    graphs = engine.runner.graphs
    for b in args.batch:
        done = []
        params = SamplingParams(max_tokens=args.steps + 3, temperature=0.0, ignore_eos=True)
        for i in range(b):
            engine.submit(("p", b, i), [(i * 7 + j) % 1000 + 5 for j in range(args.ctx)], params,
                          lambda out: done.append(out) if out.finished else None, start=True, end=True, stateless=True)
        engine._drain()
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
        engine.runner.graphs = graphs
        engine.run_until_idle()
        per_family = collections.Counter()
        count = collections.Counter()
        for ev in prof.key_averages():
            if ev.device_type == torch.autograd.DeviceType.CUDA or getattr(ev, "device_time_total", 0):
                t = getattr(ev, "device_time_total", None) or ev.cuda_time_total
                f = family(ev.key)
                per_family[f] += t / args.steps
                count[f] += ev.count / args.steps
        total = sum(per_family.values())
        print(f"\n## batch {b}, context ~{args.ctx}: GPU kernel time per eager decode step {total / 1000:.3f} ms; "
              f"graph replay {replay_ms:.3f} ms (blas {args.blas or 'default'})")
        print("| family | us / step | kernels / step | share |\n|---|---:|---:|---:|")
        for f, t in per_family.most_common(10):
            print(f"| {f} | {t:.0f} | {count[f]:.0f} | {t / total:.1%} |")


if __name__ == "__main__":
    main()
