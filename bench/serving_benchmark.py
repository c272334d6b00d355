"""Serving benchmark: output tokens/s, TTFT and TPOT percentiles per concurrency level.

Systems (``--systems``; the results file describes only those that ran):
- ``tritonkv``: ``tritonkv serve`` (the CLI, one instance per model), gRPC streaming on
  ``llm_stateless`` through ``tritonkv_client``, clients in processes (bench/serving_clients.py);
- ``tritonkv-2x2``: the same server with ``--instances 2``: ``llm`` and ``llm_stateless``,
  two instances each; half of the clients on each model (``llm``: one single-turn
  conversation per request);
- ``inprocess``: the server's engine built in this process (``tritonkv.engine.factory``) and
  driven by client threads: no tritonserver, no gRPC; ``inprocess-eager``: the same with
  CUDA graphs off;
- ``hf-static``: the peer, HF generate with a static KV cache and its decode step compiled by
  torch.compile (bench/peer_static_cache.py, a subprocess), one batch of B prompts at a time
  for each B in ``--peer-batch`` (reported at concurrency B).

Workload per level c: ``max(c, --min-requests)`` requests, ``c`` closed-loop clients; request
i has its own random prompt of ``--prompt-tokens`` ids (seeded; no prefix sharing; the same
prompt i on every system) and generates exactly ``--max-tokens`` tokens (greedy, ignore_eos).
TTFT = submit -> first token; TPOT = (last token - first token) / (tokens - 1); throughput =
all output tokens / wall time of the level.

Greedy cross-check (asserted): the served systems' tokens against the in-process engine's,
request by request, at every level both ran. At c=1 (batch 1 on both sides, the same kernels
and graphs) every request must be equal, or the run fails; a run without c=1 asserts nothing. At
higher levels continuous batching groups requests differently in each run, so the bf16
GEMMs see other shapes and a near-tie may flip a token: such requests are counted (with the
first position where they differ), not failed; fp32 runs (the CPU) are asserted at every level.

    python bench/serving_benchmark.py --tiny             # the demo model, seconds: proves the script
    python bench/serving_benchmark.py --synthetic llama3-8b --concurrency 1 64 128 256 \\
        --prompt-tokens 200 --max-tokens 180               # the GPU run (bench/gpu_run.sh serving)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, os.path.join(ROOT, "client"), os.path.join(ROOT, "backend")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from peer_static_cache import prompts_for as make_prompts  # noqa: E402
from serving_clients import Sample, run_level as run_clients  # noqa: E402
from serving_report import cross_check, markdown, merge_earlier, plot, summarize, write_results  # noqa: E402
from tritonkv_client.first_token_stages import read_stages, stage_means  # noqa: E402

SYSTEMS = ("tritonkv", "tritonkv-2x2", "inprocess", "inprocess-eager", "hf-static")
DESCRIPTION = {
    "tritonkv": "`tritonkv serve` (one instance per model), gRPC streaming on llm_stateless, client processes",
    "tritonkv-2x2": "`tritonkv serve --instances 2`: llm and llm_stateless, 2 instances each, "
                    "half of the clients on each model (llm: a single-turn conversation per request)",
    "inprocess": "the server's engine in this process (CUDA graphs on where CUDA), client threads",
    "inprocess-eager": "the same engine with CUDA graphs off",
    "hf-static": "HF generate, static KV cache, decode compiled by torch.compile (gpt-fast style), "
                 "one batch of B prompts (reported at concurrency B)",
}


def inprocess_engine(checkpoint: str, engine_params: dict, graphs: bool):
    from tritonkv.config import EngineConfig
    from tritonkv.engine.factory import build_engine

    params = dict(engine_params)
    if graphs is False:
        params["enable_cuda_graphs"] = False
    engine = build_engine(EngineConfig.from_parameters(params, checkpoint=checkpoint))  # --engine-param: strings
    engine.start_loop()
    return engine


def close_engine(engine) -> None:
    engine.stop_loop()
    graphs = getattr(getattr(engine, "runner", None), "graphs", None)
    if hasattr(graphs, "clear"):
        graphs.clear()
    engine.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def wait_device_free(timeout_s: float = 120) -> None:
    """Until the GPU's memory is free again: a stopped server's processes (its engine core
    exits a grace period after its last frontend) may hold it for a while, and the next system
    needs the weights and the KV pool again."""
    if not torch.cuda.is_available():
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free, total = torch.cuda.mem_get_info()
        if free > 0.85 * total:
            return
        time.sleep(1)
    print(f"GPU memory still held after {timeout_s:.0f} s: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free", flush=True)


def run_threads(request, prompts, concurrency: int, max_tokens: int):
    """In-process clients: ``concurrency`` threads, client k sends requests k, k + c, ..."""
    samples: list = [None] * len(prompts)
    errors = []

    def client(k):
        try:
            for i in range(k, len(prompts), concurrency):
                samples[i] = Sample(*request(prompts[i], max_tokens))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, first: {errors[0]}")
    return samples, wall


def measure_levels(run, args, prompts, warm, results, tokens, system, engine=None, stages=None):
    """Warm-up (one full request, then a short burst), then every level. ``stages``: reads the
    system's first-token stage sums (tritonkv_client/first_token_stages.py) before and after
    each level, for their means."""
    run(warm[:1], 1, args.max_tokens)
    run(warm, min(16, max(args.concurrency)), 8)
    for c in args.concurrency:
        n = max(c, args.min_requests)
        if engine is not None and hasattr(engine, "step_times"):
            engine.step_times.reset()
        before = stages() if stages is not None else None
        samples, wall = run(prompts[:n], c, args.max_tokens)
        r = results.setdefault(system, {})[str(c)] = summarize(samples, wall)
        if stages is not None:
            r["first_token_stages_ms"] = level_stages(stages, before, n)
        tokens.setdefault(system, {})[str(c)] = [s.tokens for s in samples]
        if engine is not None and hasattr(engine, "step_times"):
            r["step_breakdown"] = engine.step_times.summary()
        print(f"{system:15s} c={c:<4d} {r['output_tokens_per_s']:9.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:8.1f} ms"
              f"  TPOT p50 {r['tpot_p50_ms'] or 0:6.2f} ms  ({n} requests, {wall:.1f} s)", flush=True)


def level_stages(read, before, n: int, timeout_s: float = 5.0) -> dict | None:
    """The stage means of a level's ``n`` requests (a server publishes its sums twice a second:
    wait for all ``n``)."""
    deadline = time.monotonic() + timeout_s
    after = read()
    while after[1] - before[1] < n and time.monotonic() < deadline:
        time.sleep(0.2)
        after = read()
    return stage_means(before, after)


def measure_inprocess(args, checkpoint, params, system, prompts, warm, results, tokens) -> None:
    """The in-process engine's levels; on return nothing references the engine any more, so
    its weights, KV pool and graph pools go back to the device (the next system needs them)."""
    from inprocess import engine_request
    from tritonkv.server.first_token_stages import FirstTokenStages

    engine = inprocess_engine(checkpoint, params, graphs=None if system == "inprocess" else False)
    stages = FirstTokenStages()
    try:
        def run(ps, c, n):
            return run_threads(lambda p, m: engine_request(engine, p, m, stages), ps, c, n)

        measure_levels(run, args, prompts, warm, results, tokens, system, engine, stages.snapshot)
    finally:
        close_engine(engine)
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_peer(args, checkpoint, results, tokens, meta):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peer.json")
        cmd = [sys.executable, os.path.join(HERE, "peer_static_cache.py"), "--checkpoint", checkpoint,
               "--batch", *map(str, args.peer_batch), "--prompt-tokens", str(args.prompt_tokens),
               "--max-tokens", str(args.max_tokens), "--json", out]
        proc = subprocess.run(cmd, timeout=args.peer_timeout, text=True, capture_output=True)
        sys.stdout.write(proc.stdout[-2000:])
        if proc.returncode != 0:
            raise RuntimeError(f"peer_static_cache.py failed ({proc.returncode}): {proc.stderr[-1500:]}")
        with open(out) as f:
            peer = json.load(f)
    meta["hf_static_peer"] = {k: v for k, v in peer.items() if k != "batches"}
    for b, r in peer["batches"].items():
        results.setdefault("hf-static", {})[b] = {
            "requests": r["batch"], "output_tokens": r["batch"] * args.max_tokens, "wall_s": r["wall_s"],
            "output_tokens_per_s": r["tok_per_s"], "ttft_p50_ms": r["ttft_ms"], "ttft_p90_ms": None,
            "ttft_p99_ms": None, "tpot_p50_ms": r["tpot_ms"], "tpot_p90_ms": None, "tpot_p99_ms": None,
            "e2e_p50_ms": r["wall_s"] * 1000, "ttft_ms": [r["ttft_ms"]] * r["batch"],
            "compiled_graphs": r["compiled_graphs"]}
        tokens.setdefault("hf-static", {})[b] = r["tokens"]


def reference_numbers(args, checkpoint, device) -> dict:
    """The floor from a copy-bandwidth measurement, and (--hf-batch) HF eager generate in one batch."""
    from inprocess import copy_bandwidth, hf_batch_generate, kv_bytes_per_token, weight_stream_bytes
    from tritonkv.model.llama import CausalLM
    from tritonkv.model.model_config import ModelConfig

    bw = copy_bandwidth(device)
    cfg = ModelConfig.from_checkpoint(checkpoint)
    with torch.device("meta"):
        weights = weight_stream_bytes(CausalLM(cfg).to(torch.bfloat16))
    kv_tok = kv_bytes_per_token(cfg, 2)
    ref = {"copy_bandwidth_GBps": bw / 1e9, "weight_stream_GB": weights / 1e9}
    mean_ctx = args.prompt_tokens + args.max_tokens / 2
    for c in args.concurrency:
        step_s = (weights + c * mean_ctx * kv_tok) / bw
        ref[f"floor_c{c}"] = {"step_ms": step_s * 1000, "tok_per_s": c / step_s}
    prompts = make_prompts(max(args.hf_batch or [1]), args.prompt_tokens, cfg.vocab_size)
    for b in args.hf_batch or []:
        tps, _ = hf_batch_generate(checkpoint, prompts[:b], args.max_tokens, device)
        ref[f"hf_generate_eager_batch{b}_tok_per_s"] = tps
    print(json.dumps(ref), flush=True)
    return ref


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="HF-format checkpoint (default: the demo model)")
    p.add_argument("--synthetic", choices=("llama3-8b", "llama-1b"),
                   help="random bf16 weights of this shape (written once to --synthetic-dir) with GPU settings")
    p.add_argument("--synthetic-dir", default="/tmp/tritonkv-synthetic")
    p.add_argument("--tiny", action="store_true",
                   help="the demo model, concurrency 1 4, 16-token prompts, 8 tokens, 2 client processes, "
                        "peer batches 1 4: proves the script in about a minute on a CPU")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 128, 256])
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=180)
    p.add_argument("--systems", nargs="+", default=["tritonkv", "tritonkv-2x2", "inprocess", "hf-static"],
                   choices=SYSTEMS)
    p.add_argument("--client-procs", type=int, default=0, help="client processes (0: half the cores, at most 16)")
    p.add_argument("--peer-batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--peer-timeout", type=float, default=420)
    p.add_argument("--hf-batch", type=int, nargs="*", default=None, help="also HF eager generate in one batch")
    p.add_argument("--engine-param", action="append", default=[], metavar="KEY=VALUE",
                   help="engine setting for the server and the in-process engine (repeatable)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="serving", help="file stem of the results")
    p.add_argument("--merge", metavar="JSON", help="add this run's systems to an earlier results file")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.concurrency, args.min_requests, args.prompt_tokens, args.max_tokens = [1, 4], 4, 16, 8
        args.peer_batch, args.client_procs = [1, 4], args.client_procs or 2
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine_params: dict = {}
    if args.synthetic:
        from synthetic_checkpoint import write_synthetic

        args.checkpoint = write_synthetic(args.synthetic, os.path.join(args.synthetic_dir, args.synthetic))
        engine_params = {"dtype": "bfloat16", "kv_cache_memory_mb": 40000, "max_num_seqs": max(256, *args.concurrency),
                         "max_num_batched_tokens": 8192}
    engine_params.update(kv.split("=", 1) for kv in args.engine_param)
    from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

    checkpoint = os.path.abspath(args.checkpoint or ensure_demo_checkpoint())
    with open(os.path.join(checkpoint, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prompts = make_prompts(max(max(args.concurrency), args.min_requests), args.prompt_tokens, vocab, seed=0)
    warm = make_prompts(16, args.prompt_tokens, vocab, seed=1)
    procs = args.client_procs or max(1, min(16, (os.cpu_count() or 2) // 2))
    results, tokens, commands = {}, {}, {}
    meta = {"command": " ".join(["python bench/serving_benchmark.py", *argv]),
            "checkpoint": (f"synthetic {args.synthetic} (random bf16 weights)" if args.synthetic
                           else checkpoint if args.checkpoint else "the generated demo model (fp32)"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
            "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "min_requests": args.min_requests,
            "concurrency": args.concurrency, "client_processes": procs, "engine_params": engine_params,
            "systems": {}, "server_commands": commands}
    if device.type == "cuda" and args.synthetic:
        meta["reference"] = reference_numbers(args, checkpoint, device)
        torch.cuda.empty_cache()  # the copy-bandwidth buffers
    if args.merge:
        results, tokens = merge_earlier(args.merge, meta, results, tokens, replacing=args.systems)
    failed = []
    for system in args.systems:
        try:
            if system.startswith("tritonkv"):
                from served import served

                two = system == "tritonkv-2x2"
                with served(checkpoint, instances=2 if two else 1, params=engine_params) as (url, cmd, metrics):
                    commands[system] = cmd
                    models = ("llm_stateless", "llm") if two else ("llm_stateless",)

                    def run(ps, c, n, url=url, models=models):
                        samples, wall, _ = run_clients(url, ps, c, n, procs, models)
                        return samples, wall

                    measure_levels(run, args, prompts, warm, results, tokens, system,
                                   stages=lambda metrics=metrics: read_stages(metrics))
            elif system.startswith("inprocess"):
                measure_inprocess(args, checkpoint, {**engine_params, "device": device.type}, system,
                                  prompts, warm, results, tokens)
            else:
                run_peer(args, checkpoint, results, tokens, meta)
            meta["systems"][system] = DESCRIPTION[system]
        except Exception as e:  # noqa: BLE001  (recorded, the other systems still run)
            failed.append(f"{system}: {type(e).__name__}: {e}")
            print(f"{system} FAILED: {type(e).__name__}: {e}", flush=True)
        if system.startswith("tritonkv"):
            wait_device_free()
        meta["cross_check"] = cross_check(tokens, exact_all=device.type == "cpu")
        meta["failed"] = failed
        write_results(args, meta, results, tokens)
    bad = [k for k, v in meta["cross_check"].items() if v.get("verdict") == "FAILED"]
    asserted = any(v.get("verdict") == "passed" for v in meta["cross_check"].values())
    print(json.dumps(meta["cross_check"], indent=1))
    print(markdown(results, meta["concurrency"]))
    print(f"serving benchmark: {len(meta['systems'])} of {len(args.systems)} systems ran"
          f"{' (failed: ' + '; '.join(f[:120] for f in failed) + ')' if failed else ''}; greedy cross-check "
          f"{'FAILED for ' + ', '.join(bad) if bad else 'passed' if asserted else 'not asserted'}; "
          f"wrote {os.path.join(args.out, args.name)}.md", flush=True)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
