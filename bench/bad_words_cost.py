"""Cost of bad_words in the sampler's penalty pass (engine/sampler.py ``apply_penalties`` and the
table's ``record``), per decode step, for a batch whose every row holds a penalty slot: the
penalties alone against the same with ``--words`` multi-token words (2 to 5 tokens) and as many
one-token words per row. The words are token ids (the tokenizer plays no part in the step).

    python bench/bad_words_cost.py --device cuda --rows 64 --vocab 128256
    python bench/bad_words_cost.py --rows 64 --vocab 32000 --steps 20     # CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "backend"))

from tritonkv.engine.sampler import PenaltyRows, apply_penalties  # noqa: E402
from tritonkv.sampling.params import SamplingParams  # noqa: E402
from tritonkv.sampling.penalty_state import PenaltyTable  # noqa: E402


def step_ms(device: str, rows: int, vocab: int, words: int, steps: int) -> float:
    table = PenaltyTable(vocab, device)
    banned = [[t, t + 1, t + 2, t + 3, t + 4][: 2 + i % 4] for i, t in enumerate(range(100, 100 + 7 * words, 7))]
    banned += [[50 + i] for i in range(words)]
    params = SamplingParams(max_tokens=steps + 10, presence_penalty=0.5, repetition_penalty=1.1)
    states = [table.open(params, [1, 2, 3], [2], banned if words else []) for _ in range(rows)]
    dev = torch.device(device)
    slots = torch.tensor([s.slot for s in states], device=dev)
    pen = PenaltyRows(table, torch.arange(rows, device=dev), slots, torch.full((rows,), 1.1, device=dev),
                      torch.full((rows,), 0.5, device=dev), torch.zeros(rows, device=dev),
                      torch.zeros(rows, dtype=torch.int32, device=dev))
    logits = torch.randn(rows, vocab, device=dev)

    def one():
        x = apply_penalties(logits, pen)
        table.record(slots, x.argmax(dim=-1))

    for _ in range(5):
        one()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--words", type=int, default=16, help="multi-token words per row (and as many one-token ones)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the fastest is kept")
    ap.add_argument("--out", default=None, help="also write the result, with this command line, to a markdown file")
    args = ap.parse_args()
    times = {0: [], args.words: []}
    for i in range(args.repeats):  # alternating, each order as often
        for words in ((0, args.words) if i % 2 == 0 else (args.words, 0)):
            times[words].append(step_ms(args.device, args.rows, args.vocab, words, args.steps))
    base, with_words = min(times[0]), min(times[args.words])
    line = (f"device {args.device}, {args.rows} rows, vocab {args.vocab}: penalty pass {base:.3f} ms/step; "
            f"with {args.words} + {args.words} bad words per row {with_words:.3f} ms/step "
            f"({(with_words / base - 1) * 100:+.1f}%)")
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# bad_words in the sampler's penalty pass ({time.strftime('%Y-%m-%d')})\n\n"
                    f"Command: `python bench/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}` "
                    f"({os.cpu_count()} CPUs; fastest of {args.repeats} alternating runs each)\n\n{line}\n")


if __name__ == "__main__":
    main()
