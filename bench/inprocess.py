"""The engine driven in-process (no tritonserver), the hardware floor, and HF generate in one
batch: the references that the served numbers are read against (bench/serving_benchmark.py
--synthetic).

- ``copy_bandwidth``: device-to-device copy, bytes read + written per second (the ceiling).
- ``decode_floor_ms``: one decode step must stream every weight except the embedding table
  (which is gathered, not streamed) plus each sequence's KV: bytes / ceiling.
- ``engine_request``: one request to a started engine (its own thread, as in the server),
  each token timed at ``emit``; bench/serving_benchmark.py runs ``c`` such clients.
"""

from __future__ import annotations

import threading
import time

import torch


def copy_bandwidth(device, nbytes: int = 2 << 30, iters: int = 20) -> float:
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(device)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        b.copy_(a)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1000)
    times.sort()
    return 2 * nbytes / times[len(times) // 2]


def weight_stream_bytes(model) -> int:
    """Bytes a decode step reads: every parameter except the input embedding table (a tied
    lm_head still streams it once)."""
    embed = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    # (a tied lm_head is the same Parameter, so parameters() lists it once, as embed)
    if model.lm_head.weight is embed:
        total += embed.numel() * embed.element_size()
    return total


def kv_bytes_per_token(model_config, elem_size: int) -> int:
    return 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * elem_size


def engine_request(engine, prompt: list[int], max_tokens: int, stages=None):
    """One greedy request through a started engine, timed at ``emit`` as a client would see
    it: returns (tokens, ttft_s, tpot_s, e2e_s). ``stages`` (a FirstTokenStages) gets its
    first token's stages, the frontend's two with nothing between them and the engine."""
    from tritonkv.engine.requests import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    done = threading.Event()
    times, toks, errors = [], [], []

    def emit(out):
        now = time.perf_counter()
        if stages is not None and out.first_token_times is not None:
            stages.add(taken, out.first_token_times, time.monotonic())
        times.extend([now] * len(out.token_ids))
        toks.extend(out.token_ids)
        if out.finished:
            if out.error:
                errors.append(out.error)
            done.set()

    with _LOCK:
        cid = ("bench", next(_CORR_IDS))
    sent, taken = time.perf_counter(), time.monotonic()
    engine.submit(cid, prompt, params, emit, start=True, end=True, stateless=True)
    done.wait()
    end = time.perf_counter()
    if errors:
        raise RuntimeError(errors[0])
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return toks, times[0] - sent, tpot, end - sent


_LOCK = threading.Lock()
_CORR_IDS = iter(range(1, 1 << 62))


@torch.inference_mode()
def hf_batch_generate(checkpoint: str, prompts, max_tokens: int, device, dtype=torch.bfloat16):
    """HF ``generate`` (eager, its own KV cache) over all prompts in one batch, greedy.
    Returns (output tokens / s, tokens of the first prompt)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval().to(device)
    try:
        ids = torch.tensor(prompts, device=device)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                  do_sample=False, pad_token_id=0)
        model.generate(ids[:, :16], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        return ids.shape[0] * max_tokens / wall, out[0, ids.shape[1]:].tolist()
    finally:
        del model
        torch.cuda.empty_cache()
