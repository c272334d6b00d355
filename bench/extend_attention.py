"""Paged prefill / extend attention benchmark (run on the GPU through the device tool).

  PYTHONPATH=backend python3 bench/extend_attention.py [--out DIR] [--sweep]

bf16, 32 query heads / 8 KV heads, head dim 128, block size 16 (blocks in random order).
A 4096-token chunk per sequence on top of a cached prefix of 0 (fresh prefill), 4k and 12k
tokens, batch 1 and 4; causal within the chunk. TFLOP/s counts only the visible (unmasked)
query-key pairs: 4 * D * H * sum over queries of visible keys.
Peer: torch scaled_dot_product_attention forced onto its flash backend over contiguous
[B, H, L, D] tensors (causal; bottom-right aligned via causal_lower_right when there is a
prefix), KV heads expanded to 32 outside the timing if the flash path rejects enable_gqa.
Writes extend_attention.json / .md / .png under --out, prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "backend"))
from tritonkv.kernels.extend_attention import extend_attention_triton  # noqa: E402

H, HKV, D, PAGE = 32, 8, 128, 16
CHUNK = 4096
CASES = [(1, 0), (1, 4096), (1, 12288), (4, 0), (4, 4096)]  # (batch, prefix)
SWEEP = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
         (64, 64, 4, 4), (128, 64, 8, 4), (128, 64, 8, 2), (64, 128, 4, 3)]


def bench(fn, rep=300):
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


class Inputs:
    def __init__(self, batch, prefix):
        dev = "cuda"
        ctx = prefix + CHUNK
        nblk = ctx // PAGE
        num_blocks = batch * nblk + 5
        self.block_tables = torch.randperm(num_blocks, device=dev)[: batch * nblk].int().view(
            batch, nblk).contiguous()
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev) * CHUNK
        self.q = torch.randn(batch * CHUNK, H, D, device=dev, dtype=torch.bfloat16)
        self.k = torch.randn(num_blocks, PAGE, HKV, D, device=dev, dtype=torch.bfloat16)
        self.v = torch.randn(num_blocks, PAGE, HKV, D, device=dev, dtype=torch.bfloat16)
        self.out = torch.empty_like(self.q)
        self.batch, self.prefix, self.ctx = batch, prefix, ctx
        bt = self.block_tables.long()
        self.kc = self.k[bt].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
        self.vc = self.v[bt].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
        self.qc = self.q.view(batch, CHUNK, H, D).transpose(1, 2).contiguous()

    def flops(self):
        # query j (0-based in chunk) sees prefix + j + 1 keys
        vis = self.batch * (CHUNK * self.prefix + CHUNK * (CHUNK + 1) // 2)
        return 4 * D * H * vis


def ours(s, **cfg):
    return lambda: extend_attention_triton(
        s.q, s.k, s.v, s.block_tables, s.seq_lens, s.qsl, D ** -0.5, max_query_len=CHUNK,
        out=s.out, **cfg)


def sdpa(s):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    mask_kw = {"is_causal": True}
    if s.prefix:
        from torch.nn.attention.bias import causal_lower_right

        mask_kw = {"attn_mask": causal_lower_right(CHUNK, s.ctx)}

    def gqa():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(s.qc, s.kc, s.vc, scale=D ** -0.5,
                                                  enable_gqa=True, **mask_kw)
    try:
        gqa()
        torch.cuda.synchronize()
        return gqa, "flash, enable_gqa"
    except Exception as e:  # noqa: BLE001
        print(f"sdpa flash + enable_gqa failed ({type(e).__name__}: {str(e)[:200]}); "
              "expanding KV heads", flush=True)
    ke = s.kc.repeat_interleave(H // HKV, dim=1)
    ve = s.vc.repeat_interleave(H // HKV, dim=1)

    def expanded():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(s.qc, ke, ve, scale=D ** -0.5, **mask_kw)
    expanded()
    torch.cuda.synchronize()
    return expanded, "flash, KV expanded to 32 heads"


def check(s, out):
    ref = torch.nn.functional.scaled_dot_product_attention(
        s.qc.float(), s.kc.float().repeat_interleave(H // HKV, 1),
        s.vc.float().repeat_interleave(H // HKV, 1), scale=D ** -0.5,
        attn_mask=torch.ones(CHUNK, s.ctx, dtype=torch.bool, device="cuda").tril(s.prefix))
    o = out.view(s.batch, CHUNK, H, D).transpose(1, 2).float()
    return ((o - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["python bench/extend_attention.py", *sys.argv[1:]])}
    print(info, flush=True)
    rows, sweep = [], []
    for batch, prefix in CASES:
        s = Inputs(batch, prefix)
        label = f"{batch}x({prefix // 1024}k+4k)"
        row = {"case": label, "batch": batch, "prefix": prefix, "chunk": CHUNK,
               "tflop": s.flops() / 1e12}
        f = ours(s)
        f()
        row["ours_err"] = check(s, s.out) if batch * s.ctx <= 16384 else None
        row["ours_ms"] = bench(f)
        if args.sweep:
            best = (row["ours_ms"], "default")
            for bm, bn, nw, ns in SWEEP:
                cfg = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
                try:
                    t = bench(ours(s, **cfg), rep=60)
                except Exception as e:  # noqa: BLE001
                    print("cfg failed", cfg, type(e).__name__, str(e)[:150])
                    continue
                sweep.append({"case": label, **cfg, "ms": t})
                if t < best[0]:
                    best = (t, cfg)
            row["sweep_best_ms"], row["sweep_best_cfg"] = best
            print(f"  {label}: sweep best {best[0]:.3f} ms {best[1]}", flush=True)
        try:
            fn, how = sdpa(s)
            row["sdpa_ms"] = bench(fn)
            row["sdpa_how"] = how
        except Exception as e:  # noqa: BLE001
            print(f"sdpa failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        for k in [k for k in list(row) if k.endswith("_ms")]:
            row[k[:-3] + "_tflops"] = s.flops() / (row[k] * 1e-3) / 1e12
        rows.append(row)
        print(json.dumps(row), flush=True)
        del s
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "extend_attention.json"), "w") as fh:
            json.dump({"info": info, "rows": rows, "sweep": sweep}, fh, indent=1)
    lines = [
        f"# Paged extend / prefill attention, {info['device']} ({info['time']})",
        "",
        f"Command: `{info['command']}`",
        "",
        f"torch {info['torch']}, triton {info['triton']}. bf16, 32 q heads / 8 KV heads, d=128, "
        "page 16 (random block order), 4096-token chunk per sequence on a cached prefix, causal. "
        "TFLOP/s over visible query-key pairs only; median of triton do_bench.",
        "",
        "| batch x (prefix + chunk) | TFLOP | ours ms | ours TFLOP/s | SDPA flash ms | "
        "SDPA TFLOP/s | ours / SDPA speed | ours err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = r["sdpa_ms"] / r["ours_ms"] if "sdpa_ms" in r else float("nan")
        err = f"{r['ours_err']:.1e}" if r.get("ours_err") is not None else "-"
        lines.append(
            f"| {r['case']} | {r['tflop']:.2f} | {r['ours_ms']:.3f} | {r['ours_tflops']:.0f} | "
            f"{r.get('sdpa_ms', float('nan')):.3f} | {r.get('sdpa_tflops', float('nan')):.0f} | "
            f"{sp:.2f}x | {err} |")
    how = {r.get("sdpa_how") for r in rows if "sdpa_how" in r}
    lines += ["", f"SDPA path: {', '.join(sorted(how))}."]
    if any("sweep_best_ms" in r for r in rows):
        lines += ["", "Config sweep, best per case: " + "; ".join(
            f"{r['case']}: {r['sweep_best_ms']:.3f} ms {r['sweep_best_cfg']}" for r in rows
            if "sweep_best_ms" in r)]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "extend_attention.md"), "w") as fh:
        fh.write(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["ours_tflops"] for r in rows], 0.4,
               label="tritonkv paged extend")
        ax.bar([x + 0.2 for x in xs], [r.get("sdpa_tflops", 0) for r in rows], 0.4,
               label="SDPA flash (contiguous)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["case"] for r in rows])
        ax.set_ylabel("TFLOP/s (visible pairs)")
        ax.set_title("Extend attention, 4k-token chunks, bf16 32q/8kv, d=128")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "extend_attention.png"), dpi=110)
    except Exception as e:  # noqa: BLE001
        print("plot failed", e)
    print(table)


if __name__ == "__main__":
    main()
