"""Decode-kernel config exploration (GPU): time named configs per shape, or run one config a
few times under ncu.

  PYTHONPATH=backend python3 bench/decode_explore.py --out $OUT            # time PLAN
  ncu ... python3 bench/decode_explore.py --profile 16x8k_fp8 [--cfg JSON] # one config, 3 calls

Same inputs, timing (CUDA-graph replay over rotating input sets) and error check as
bench/decode_attention.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_attention as B  # noqa: E402

SHAPES = {"1x32k": (1, 32768, torch.bfloat16), "16x4k": (16, 4096, torch.bfloat16),
          "64x1k": (64, 1024, torch.bfloat16), "128x2k": (128, 2048, torch.bfloat16),
          "16x8k": (16, 8192, torch.bfloat16), "16x8k_fp8": (16, 8192, torch.float8_e4m3fn),
          "16x8k_fp8_vmajor": (16, 8192, torch.float8_e4m3fn),
          "16x8k_int8": (16, 8192, torch.int8), "1x32k_fp8": (1, 32768, torch.float8_e4m3fn),
          "1x32k_fp8_vmajor": (1, 32768, torch.float8_e4m3fn),
          "64x1k_fp8": (64, 1024, torch.float8_e4m3fn), "128x2k_fp8": (128, 2048, torch.float8_e4m3fn),
          "4x2k": (4, 2048, torch.bfloat16), "2x8k": (2, 8192, torch.bfloat16),
          "1x4k": (1, 4096, torch.bfloat16), "4x2k_fp8": (4, 2048, torch.float8_e4m3fn),
          "1x32k_vminor": (1, 32768, torch.bfloat16), "16x4k_vminor": (16, 4096, torch.bfloat16),
          "64x1k_vminor": (64, 1024, torch.bfloat16), "128x2k_vminor": (128, 2048, torch.bfloat16)}


def c(bn, nw, ns, sp, g, **kw):
    return dict(block_n=bn, num_warps=nw, num_stages=ns, num_splits=sp, gather_ids=g, **kw)


PLAN = {
    # run 20: per-key page/slot division removed (run 19: 32-bit offsets dropped, 372 vs 359 us
    # at 128x2k); EVEN (unmasked full tiles) and shallower pipelines per block placement
    "16x4k": [None, dict(even=True), dict(even=True, num_stages=3), c(64, 8, 4, 1, True, even=True)],
    "64x1k": [None, c(32, 4, 4, 1, False, even=True), c(32, 4, 4, 1, False),
              c(64, 4, 2, 1, False, even=True)],
    "128x2k": [None, dict(even=True), c(64, 4, 2, 1, False, even=True),
               c(64, 4, 3, 1, True, even=True)],
    "1x32k": [None, dict(even=True), c(64, 4, 4, 16, True, even=True)],
    "16x8k": [None, dict(even=True), dict(even=True, num_stages=3)],
    "16x8k_fp8": [None],
    "16x8k_int8": [None],
}


def label(cfg):
    if cfg is None:
        return "default"
    return " ".join(f"{k}={v}" for k, v in cfg.items()).replace("torch.", "")


def extend_fp8():
    """Extend (4k-token chunk after a 4k prefix) over an fp8 cache: V token-minor vs major."""
    import extend_attention as E
    from tritonkv.kernels.extend_attention import extend_attention_triton
    from tritonkv.cache.layout import token_minor_view
    from tritonkv.ops.quant import dynamic_scale, quantize

    out = []
    s = E.Inputs(1, 4096)
    ks, vs = dynamic_scale(s.k.float(), torch.float8_e4m3fn), dynamic_scale(s.v.float(), torch.float8_e4m3fn)
    k8 = quantize(s.k.float(), ks[..., None], torch.float8_e4m3fn)
    v8 = quantize(s.v.float(), vs[..., None], torch.float8_e4m3fn)
    vmin = token_minor_view(v8.permute(0, 2, 3, 1).contiguous())
    for name, v, vp in (("token-major V", v8, False), ("token-minor V", vmin, False),
                        ("token-minor V, whole pages", vmin, True)):
        fn = lambda: extend_attention_triton(  # noqa: E731
            s.q, k8, v, s.block_tables, s.seq_lens, s.qsl, E.D ** -0.5, max_query_len=E.CHUNK,
            k_scale=ks, v_scale=vs, out=s.out, v_pages=vp)
        ref = extend_attention_triton(s.q, k8, v8.contiguous(), s.block_tables, s.seq_lens, s.qsl,
                                      E.D ** -0.5, max_query_len=E.CHUNK, k_scale=ks, v_scale=vs)
        got = fn().float()
        diff = ((got - ref.float()).norm() / ref.float().norm()).item()
        ms = E.bench(fn)
        tf = s.flops() / (ms * 1e-3) / 1e12
        out.append({"shape": "extend 1x(4k+4k) fp8", "cfg": name, "us": ms * 1e3, "err": diff})
        print(f"extend fp8 1x(4k+4k) {name:20s} {ms * 1e3:8.1f} us {tf:6.1f} TFLOP/s "
              f"diff vs token-major {diff:.1e}", flush=True)
    return out


def host_overhead():
    """Host time per eager call (no sync inside the loop): default config vs run-9 config."""
    import time

    s = B.Inputs(1, 32768)
    for name, cfg in (("default", {}), ("run 9 (32-token tiles, ~4 waves, ids per tile)",
                                        dict(block_n=32, num_stages=4, gather_ids=False))):
        call = B.ours_call(**cfg)
        for _ in range(20):
            call(s)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            call(s)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"host 1x32k {name}: {(t1 - t0) / 200 * 1e6:.1f} us/call enqueue, "
              f"{(t2 - t0) / 200 * 1e6:.1f} us/call incl. drain", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--only", default="")
    ap.add_argument("--profile", default="", help="shape: run one config 3 times (for ncu)")
    ap.add_argument("--cfg", default="", help="JSON config for --profile (default: default)")
    ap.add_argument("--sdpa", action="store_true", help="--profile SDPA (enable_gqa) instead")
    ap.add_argument("--blocks", default="random",
                    help="comma-separated block placements (decode_attention.BLOCK_PLACEMENTS)")
    args = ap.parse_args()
    if args.profile:
        b, ctx, dt = SHAPES[args.profile]
        s = B.Inputs(b, ctx, dt, contiguous=args.sdpa)
        cfg = json.loads(args.cfg) if args.cfg else {}
        call = B.sdpa_fns([s])["sdpa_gqa"] if args.sdpa else B.ours_call(**cfg)
        for _ in range(3):
            call(s)
        torch.cuda.synchronize()
        return
    res = []
    if args.only and "extend" in args.only:
        res += extend_fp8()
    if not args.only or "host" in args.only:
        host_overhead()
    for blocks, name in [(p, n) for n in PLAN for p in args.blocks.split(",")]:
        cfgs = PLAN[name]
        if args.only and name not in args.only.split(","):
            continue
        B.LAYOUT["blocks"] = blocks
        b, ctx, dt = SHAPES[name]
        sets = B.make_sets(b, ctx, dt)
        if args.sdpa and dt == torch.bfloat16:  # SDPA over the same data, unpaged
            csets = B.make_sets(b, ctx, dt, contiguous=True)
            t = B.graph_bench(csets, B.sdpa_fns(csets)["sdpa_gqa"], reps=15) * 1e3
            res.append({"shape": name, "blocks": blocks, "cfg": "SDPA", "us": t})
            print(f"{name:10s} {blocks:11s} {'SDPA (contiguous)':70s} {t:8.1f} us", flush=True)
            del csets
        if name.endswith("vmajor"):  # 8-bit V token-major (the layout before run 10)
            for st in sets:
                st.v = st.v.contiguous()
        if name.endswith("vminor"):  # V token-minor whatever its dtype
            from tritonkv.cache.layout import token_minor_view
            for st in sets:
                st.v = token_minor_view(st.v.permute(0, 2, 3, 1).contiguous())
        for cfg in cfgs:
            kw = cfg or {}
            try:
                out = B.ours_call(**kw)(sets[0])
                err = B.check(out, sets[0])
                t = B.graph_bench(sets, B.ours_call(**kw), reps=15) * 1e3
            except Exception as e:  # noqa: BLE001
                print(f"{name:10s} {label(cfg):70s} FAILED {type(e).__name__}: {str(e)[:150]}",
                      flush=True)
                continue
            res.append({"shape": name, "blocks": blocks, "cfg": label(cfg), "us": t, "err": err})
            print(f"{name:10s} {blocks:11s} {label(cfg):70s} {t:8.1f} us  err {err:.1e}",
                  flush=True)
        del sets
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "explore.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
