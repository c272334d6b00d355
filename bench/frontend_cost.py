"""The Python share of a frontend's cost per token: decoding the core's ``Outputs`` messages,
``coalesce`` (when several steps waited), ``TextStream``, ``Reply`` and ``ReplyChannel`` down
to the response objects, with a stand-in for Triton's ``pb_utils`` whose ``send`` costs
nothing. What ``sender.send`` costs inside a real stub is not in it (on the H100 the served
rate showed ~150 us per response in all: bench/NOTES_serving.md, run 13).

    python bench/frontend_cost.py --out bench/results/frontend_cost_cpu.md

``--merge K``: K steps read together (a frontend K steps behind its core), K = 1 is a
frontend that keeps up. Input ids only (no tokenizer: the synthetic checkpoints have none).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "backend"), os.path.join(ROOT, "bench")]

from md_table import table  # noqa: E402

from tritonkv.core import messages as m  # noqa: E402
from tritonkv.engine.output import TextStream, coalesce  # noqa: E402
from tritonkv.engine.requests import TurnOutput  # noqa: E402
from tritonkv.server.triton_model import Reply  # noqa: E402
from tritonkv.server.triton_response import ReplyChannel, ReplyForm  # noqa: E402


class StandIn:
    """pb_utils' names the response path uses; nothing is sent anywhere."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors, error

    class TritonError(Exception):
        pass


class Sender:
    def __init__(self):
        self.sent = 0

    def send(self, response, flags=0):
        self.sent += 1


def messages(rows: int, steps: int, prompt_tokens: int) -> list[bytes]:
    """One encoded ``Outputs`` per step, one token per row, the last step final."""
    out = []
    for s in range(steps):
        last = s == steps - 1
        out.append(m.encoder.encode(m.Outputs([
            (rid, TurnOutput("", [1000 + s], last, "length" if last else None, 0, prompt_tokens))
            for rid in range(rows)])))
    return out


def run(encoded: list[bytes], rows: int, merge: int) -> tuple[float, int]:
    sender = Sender()
    streams = {rid: TextStream(None, (), Reply(ReplyChannel(StandIn, sender, ReplyForm(stream=True)), 1))
               for rid in range(rows)}
    t0 = time.perf_counter()
    for i in range(0, len(encoded), merge):
        items = []
        for raw in encoded[i:i + merge]:
            items.extend(m.frontend_decoder.decode(raw).items)
        for rid, out in coalesce(items) if merge > 1 else items:
            streams[rid](out)
    return time.perf_counter() - t0, sender.sent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256, help="requests of this frontend in each step")
    p.add_argument("--steps", type=int, default=180, help="tokens per request")
    p.add_argument("--merge", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    encoded = messages(args.rows, args.steps, 200)
    tokens = args.rows * args.steps
    load = os.getloadavg()[0]
    rows = []
    for k in args.merge:
        runs = [run(encoded, args.rows, k) for _ in range(args.repeats)]
        wall, sent = statistics.median(r[0] for r in runs), runs[0][1]
        rows.append([k, f"{sent:,}", f"{1e6 * wall / tokens:.1f}", f"{1e6 * wall / sent:.1f}"])
    text = "\n".join([
        "# Frontend cost per token (Python share, no Triton send)", "",
        f"`python bench/frontend_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        f"{args.rows} requests x {args.steps} tokens, one token per request per step; median of "
        f"{args.repeats}; {os.cpu_count()} cores, load average {load:.1f} at the start.", "",
        *table(["steps read together", "responses", "us per token", "us per response"], rows, right=(0, 1, 2, 3))]) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
