"""The stronger HF peer: ``generate`` with a static KV cache, its decode step compiled by
torch.compile (gpt-fast style: fixed shapes, CUDA graphs through mode "reduce-overhead"),
on the same weights, greedy, every prompt of a batch the same length (no padding).

transformers compiles the decode forward itself when the cache is static and the model is
on CUDA (``generation_config.compile_config``, default mode "reduce-overhead"); the result
records how many graphs dynamo compiled, so a run where compilation did not happen says so.
On CPU nothing is compiled (transformers' rule), which keeps the --tiny smoke run honest.

Per batch size B: one untimed generate of the full length (compilation, CUDA graph capture),
then timed, median of 3 each: ``generate(max_new_tokens=1)`` (prefill + first token: the batch's
TTFT) and ``generate(max_new_tokens=N, min_new_tokens=N)``; throughput = B x N / wall of the second;
TPOT = (wall - TTFT) / (N - 1).

    python bench/peer_static_cache.py --checkpoint DIR --batch 1 64 --prompt-tokens 200 \\
        --max-tokens 180 [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch


def prompts_for(n: int, prompt_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """The same prompts as bench/serving_benchmark.py's make_prompts (ids < 256)."""
    rng = random.Random(seed)
    return [[rng.randrange(0, min(vocab, 256)) for _ in range(prompt_tokens)] for _ in range(n)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(model, prompts: list[list[int]], max_tokens: int) -> dict:
    device = model.device
    ids = torch.tensor(prompts, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, cache_implementation="static",
              pad_token_id=model.config.eos_token_id)

    def gen(n):
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(device)
        return time.perf_counter() - t0, out

    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    gen(max_tokens)  # compile + capture
    gen(max_tokens)  # a second warm-up: reduce-overhead records its graphs on a later call
    ttft = statistics.median(gen(1)[0] for _ in range(3))
    runs = [gen(max_tokens) for _ in range(3)]
    wall, out = sorted(runs, key=lambda r: r[0])[1]  # the median run
    tokens = out[:, ids.shape[1]:]
    assert tokens.shape[1] == max_tokens, tokens.shape
    return {"batch": len(prompts), "tok_per_s": len(prompts) * max_tokens / wall, "wall_s": wall,
            "ttft_ms": ttft * 1000, "tpot_ms": (wall - ttft) / max(max_tokens - 1, 1) * 1000,
            "compiled_graphs": counters["stats"]["unique_graphs"] - before,
            "tokens": tokens.tolist()}


def run(checkpoint: str, batches: list[int], prompt_tokens: int, max_tokens: int, device: str,
        dtype: torch.dtype) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval().to(device)
    vocab = model.config.vocab_size
    prompts = prompts_for(max(batches), prompt_tokens, vocab)
    out = {"peer": "HF generate, static cache, decode compiled by torch.compile (transformers' auto-compile)",
           "transformers": transformers.__version__, "torch": torch.__version__, "dtype": str(dtype),
           "compile_config": repr(getattr(model.generation_config, "compile_config", None)), "batches": {}}
    for b in batches:
        r = measure(model, prompts[:b], max_tokens)
        if r["compiled_graphs"] == 0 and model.device.type == "cuda":
            # transformers did not compile (its criteria changed?): compile the forward as
            # gpt-fast does, and measure again
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            out["compiled_by_hand"] = True
            r = measure(model, prompts[:b], max_tokens)
        out["batches"][str(b)] = r
        print(f"static-cache peer batch {b}: {r['tok_per_s']:.1f} tok/s, TTFT {r['ttft_ms']:.1f} ms, "
              f"TPOT {r['tpot_ms']:.2f} ms, {r['compiled_graphs']} graphs compiled", flush=True)
        torch._dynamo.reset()  # a new batch size compiles afresh either way; free the old graphs
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=180)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    result = run(args.checkpoint, args.batch, args.prompt_tokens, args.max_tokens, args.device, dtype)
    result["command"] = "python bench/peer_static_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
