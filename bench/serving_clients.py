"""Closed-loop load from client processes (so the Python gRPC client is not the limit).

``run_level(grpc_url, prompts, concurrency, max_tokens, procs, models)``: ``concurrency``
clients, spread over ``procs`` processes (spawned, each with ``concurrency / procs`` threads
and one ``tritonkv_client.Client`` per thread); client ``k`` sends requests ``k``,
``k + concurrency``, ... of ``prompts`` one after another, greedy with ignore_eos, exactly
``max_tokens`` tokens each. ``models``: the model of each client in turn (``llm_stateless``:
one-shot requests; ``llm``: one conversation per request, a single turn with END), e.g.
``("llm_stateless", "llm")`` splits the clients over both models.

Times are ``time.perf_counter`` (CLOCK_MONOTONIC, one clock for every process of the
machine): a level's wall time runs from the release of the start barrier (every process
connected) to the last token of the last request.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@dataclass
class Sample:
    tokens: list[int]
    ttft_s: float
    tpot_s: float | None
    e2e_s: float
    responses: int | None = None  # Triton responses that carried the tokens (None: not a served request)


def _one(client, model: str, prompt: list[int], max_tokens: int):
    if model == "llm":
        with client.conversation() as conv:
            return conv.ask(input_ids=prompt, max_tokens=max_tokens, end=True)
    return client.generate(input_ids=prompt, max_tokens=max_tokens)


def _proc_main(grpc_url, jobs, max_tokens, barrier, results, errors):
    """One client process: a thread per (model, [(index, prompt), ...]) job."""
    for path in (os.path.join(ROOT, "client"), os.path.join(ROOT, "backend")):
        if path not in sys.path:
            sys.path.insert(0, path)
    from tritonkv_client import Client

    out, failures = [], []

    def client_thread(model, items, client):
        try:
            for index, prompt in items:
                r = _one(client, model, prompt, max_tokens)
                if r.finish_reason != "length" or r.num_tokens != max_tokens:
                    raise RuntimeError(f"request {index}: finish_reason {r.finish_reason}, {r.num_tokens} tokens")
                out.append((index, model, list(r.token_ids), r.ttft_s, r.tpot_s, r.e2e_s, r.num_responses,
                            time.perf_counter()))
        except Exception as e:  # noqa: BLE001  (a failed request fails the level)
            failures.append(f"{type(e).__name__}: {e}")

    clients = [Client(grpc_url, temperature=0.0, ignore_eos=True) for _ in jobs]
    threads = [threading.Thread(target=client_thread, args=(m, items, c)) for (m, items), c in zip(jobs, clients)]
    barrier.wait()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(out)
    errors.put(failures)
    for c in clients:
        c.close()


def run_level(grpc_url: str, prompts: list[list[int]], concurrency: int, max_tokens: int, procs: int,
              models: tuple[str, ...] = ("llm_stateless",)):
    """Returns (samples in prompt order, wall seconds, model of each sample)."""
    procs = max(1, min(procs, concurrency))
    jobs = [(models[k % len(models)], [(i, prompts[i]) for i in range(k, len(prompts), concurrency)])
            for k in range(concurrency)]
    per_proc = [jobs[p::procs] for p in range(procs)]
    ctx = mp.get_context("spawn")
    barrier, results, errors = ctx.Barrier(procs + 1), ctx.Queue(), ctx.Queue()
    workers = [ctx.Process(target=_proc_main, args=(grpc_url, j, max_tokens, barrier, results, errors), daemon=True)
               for j in per_proc]
    for w in workers:
        w.start()
    try:
        barrier.wait(timeout=300)
        start = time.perf_counter()
        rows, failures = [], []
        for _ in workers:
            rows += results.get(timeout=3600)
        for _ in workers:
            failures += errors.get(timeout=60)
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    if failures:
        raise RuntimeError(f"{len(failures)} clients failed, first: {failures[0]}")
    samples: list[Sample | None] = [None] * len(prompts)
    model_of: list[str | None] = [None] * len(prompts)
    for index, model, tokens, ttft, tpot, e2e, responses, _end in rows:
        samples[index], model_of[index] = Sample(tokens, ttft, tpot, e2e, responses), model
    # the last request's end, not the processes' exit, closes the level
    wall = max(row[-1] for row in rows) - start if rows else 0.0
    return samples, wall, model_of
