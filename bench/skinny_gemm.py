"""The skinny decode GEMM (kernels/skinny_gemm.py) against torch (cuBLASLt, as the engine sets
it) on the Llama-3-8B linear shapes at M = 1, 2, 4, 8, 16 rows: GPU time per call and achieved
GB/s against the copy bandwidth measured here (a device copy of a 2 GiB tensor, read + write).

Timing: each side runs 20 calls captured in one CUDA graph (as in a decode step: no launch
gaps), over enough weight copies that they do not fit in L2 (every call streams its weight
from HBM); the median of 5 replays. Every kernel config in CONFIGS is timed; the best is shown.

    python bench/skinny_gemm.py [--out bench/results/skinny_gemm_h200] [--write-table]

``--write-table`` writes backend/tritonkv/kernels/skinny_gemm_table.py with the (GPU, N, K, M)
whose best config beat torch by MIN_GAIN (the engine reads it when skinny_gemm is on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "backend")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tritonkv.kernels.skinny_gemm import SkinnyConfig, skinny_linear  # noqa: E402
from tritonkv.kernels.skinny_gemm_table import MIN_GAIN  # noqa: E402

# (name, K in, N out) of Llama-3-8B's linears; gate_up is the fused layer the model runs
SHAPES = [("o_proj 4096x4096", 4096, 4096), ("qkv 4096x6144", 4096, 6144), ("up 4096x14336", 4096, 14336),
          ("gate_up (fused) 4096x28672", 4096, 28672), ("down 14336x4096", 14336, 4096),
          ("lm_head 4096x128256", 4096, 128256)]
ROWS = (1, 2, 4, 8, 16)
# (block_n, block_k, split_k, num_warps, num_stages, use_dot)
CONFIGS = [(16, 256, 1, 4, 4, True), (32, 256, 1, 4, 4, True), (64, 128, 1, 4, 4, True), (32, 512, 1, 8, 3, True),
           (64, 256, 1, 8, 3, True), (32, 256, 2, 4, 4, True), (16, 256, 4, 4, 4, True), (16, 512, 1, 4, 3, False)]
CALLS = 20
L2_MARGIN = 256 * 2 ** 20  # the weight copies of one graph span at least this many bytes


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(2 ** 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    del src, dst
    return 2 * 2 ** 31 / statistics.median(times[1:]) / 1e9


def graph_time(fn, weights) -> float:
    """Seconds per call: CALLS calls in one graph, cycling over ``weights``, median of 5."""
    for w in weights[:2]:
        fn(w)  # compile / pick the algorithm outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(weights[i % len(weights)])
    graph.replay()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000 / CALLS)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="", help="write <out>.md and <out>.json")
    ap.add_argument("--write-table", action="store_true", help="write kernels/skinny_gemm_table.py")
    ap.add_argument("--shapes", nargs="*", default=None, help="names (prefixes) of SHAPES to run")
    ap.add_argument("--rows", type=int, nargs="*", default=list(ROWS))
    args = ap.parse_args()
    if args.write_table and (args.shapes or sorted(args.rows) != sorted(ROWS) or not args.out):
        # the table replaces every entry of this GPU: only a whole run, with its results file, may
        ap.error("--write-table needs the whole run (no --shapes, the default --rows) and --out")
    torch.backends.cuda.preferred_blas_library("cublaslt")  # as engine/factory.py
    dev_name = torch.cuda.get_device_name(0)
    copy_gbps = copy_bandwidth()
    cmd = "python bench/skinny_gemm.py " + " ".join(sys.argv[1:])
    lines = [f"# Skinny GEMM vs torch (cuBLASLt), {dev_name}", "", f"Command: `{cmd.strip()}`",
             f"torch {torch.__version__}; copy bandwidth {copy_gbps:.0f} GB/s (2 GiB device copy, read + write); "
             f"{CALLS} calls per CUDA graph over weights that do not fit in L2; GB/s = (weight + x + y bytes) / time.",
             "", "| layer (K x N) | M | torch us | torch GB/s (% copy) | skinny us | skinny GB/s (% copy) | "
             "best config (bn, bk, split, warps, stages, dot) | torch / skinny |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    print("\n".join(lines), flush=True)
    results, wins = [], {}
    for name, k, n in SHAPES:
        if args.shapes and not any(name.startswith(s) for s in args.shapes):
            continue
        wbytes = n * k * 2
        copies = max(2, -(-L2_MARGIN // wbytes))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nbytes = wbytes + 2 * m * (k + n)
            t_torch = graph_time(lambda w: F.linear(x, w), weights)
            ref = F.linear(x, weights[0]).float()
            best = None
            for cfg in CONFIGS:
                if not cfg[5] and m > 2:
                    continue
                conf = SkinnyConfig(*cfg)
                try:
                    got = skinny_linear(x, weights[0], config=conf).float()
                except Exception as exc:  # noqa: BLE001 - e.g. a config past the shared memory: skip it
                    print(f"  (config {cfg} at {name} M={m} skipped: {type(exc).__name__}: {str(exc)[:120]})")
                    continue
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                if err > 0.02:
                    raise SystemExit(f"{name} M={m} config {cfg}: relative error {err:.3g} against torch")
                t = graph_time(lambda w, conf=conf: skinny_linear(x, w, config=conf), weights)
                if best is None or t < best[0]:
                    best = (t, cfg)
            if best is None:
                print(f"| {name} | {m} | {t_torch * 1e6:.1f} | - | every config failed | - | - | - |", flush=True)
                continue
            t_sk, cfg = best
            row = {"layer": name, "k": k, "n": n, "m": m, "torch_us": t_torch * 1e6, "skinny_us": t_sk * 1e6,
                   "torch_gbps": nbytes / t_torch / 1e9, "skinny_gbps": nbytes / t_sk / 1e9, "config": list(cfg),
                   "speedup": t_torch / t_sk}
            results.append(row)
            if t_sk <= (1 - MIN_GAIN) * t_torch:
                wins[(dev_name, n, k, m)] = tuple(cfg)
            line = (f"| {name} | {m} | {row['torch_us']:.1f} | {row['torch_gbps']:.0f} ({row['torch_gbps'] / copy_gbps:.0%}) "
                    f"| {row['skinny_us']:.1f} | {row['skinny_gbps']:.0f} ({row['skinny_gbps'] / copy_gbps:.0%}) "
                    f"| {tuple(cfg)} | {row['speedup']:.3f} |")
            lines.append(line)
            print(line, flush=True)
        del weights
        torch.cuda.empty_cache()
    summary = [f"\nKernel faster by >= {MIN_GAIN:.0%} for {len(wins)} of {len(results)} (layer, M) cases."]
    for m in args.rows:  # a decode step's linears at M rows: 32 layers x (qkv, o, gate_up, down) + lm_head
        per = {r["layer"].split()[0]: r for r in results if r["m"] == m}
        if all(key in per for key in ("o_proj", "qkv", "gate_up", "down", "lm_head")):
            layers = ("qkv", "o_proj", "gate_up", "down")
            t_torch = 32 * sum(per[key]["torch_us"] for key in layers) + per["lm_head"]["torch_us"]
            t_best = 32 * sum(min(per[key]["torch_us"], per[key]["skinny_us"]) for key in layers) + \
                min(per["lm_head"]["torch_us"], per["lm_head"]["skinny_us"])
            summary.append(f"- M={m}: one step's linears (8B: 32 x qkv/o/gate_up/down + lm_head) {t_torch / 1000:.3f} ms "
                           f"with torch, {t_best / 1000:.3f} ms taking the faster of the two per layer")
    lines += summary
    print("\n".join(summary), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"device": dev_name, "torch": torch.__version__, "copy_gbps": copy_gbps, "results": results},
                      f, indent=1)
    if args.write_table:
        path = os.path.join(ROOT, "backend", "tritonkv", "kernels", "skinny_gemm_table.py")
        # the results file as committed (bench/results/<name>.md), not the run's own path
        write_table(path, dev_name, f"bench/results/{os.path.basename(args.out)}.md", wins)
        print(f"wrote {path} ({len(wins)} entries for {dev_name})")


def write_table(path: str, device: str, source: str, wins: dict) -> None:
    """Replace ``device``'s entries of the table module (its SOURCES line and WINS rows) with
    this run's, keeping the other GPUs' entries, the docstring and MIN_GAIN."""
    with open(path) as f:
        text = f.read()
    table: dict = {}
    exec(compile(text, path, "exec"), table)  # the module defines only constants
    sources = {d: s for d, s in table.get("SOURCES", {}).items() if d != device}
    sources[device] = source
    kept = {key: cfg for key, cfg in table["WINS"].items() if key[0] != device}
    kept.update(wins)
    with open(path, "w") as f:
        f.write(re.split(r"^SOURCES = ", text, maxsplit=1, flags=re.M)[0] + "SOURCES = {\n")
        for d, s in sorted(sources.items()):
            f.write(f"    {d!r}: {s!r},\n")
        f.write("}\nWINS: dict = {\n")
        for key, cfg in sorted(kept.items()):
            f.write(f"    {key!r}: {cfg!r},\n")
        f.write("}\n")


if __name__ == "__main__":
    main()
