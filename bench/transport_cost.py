"""Per-message cost of the engine core's transport (core/messages.py over pyzmq, ipc://): a
core-like process sends ``Outputs`` messages of N rows (one decode step of N requests of one
frontend) to a frontend-like process, which decodes each; and a frontend sends ``Submit``
messages that the core decodes. Measures throughput (messages/s, back to back) and the
round trip of one message (send, decode, answer, decode).

    python bench/transport_cost.py [--rows 1 64 256] [--messages 20000] [--out FILE.md]

Prints a table and, with ``--out``, writes it with the command line, the date and the
machine's load (bench/results/transport_cost_cpu.md; bench/NOTES_serving.md cites it).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "backend"))

import zmq  # noqa: E402

from tritonkv.core import messages as m  # noqa: E402
from tritonkv.engine.requests import SamplingParams, TurnOutput  # noqa: E402


def outputs(rows: int) -> m.Outputs:
    return m.Outputs([(i, TurnOutput("", [1000 + i], cached_tokens=16, prompt_tokens=200)) for i in range(rows)])


def peer(endpoint: str, rows: int, count: int, mode: str) -> None:
    """The other end: for "stream", decode ``count`` Outputs then answer once; for "ping",
    echo a decoded message ``count`` times."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 0)  # as core/client.py
    sock.connect(endpoint)
    sock.send(b"ready")
    if mode == "stream":
        n = 0
        for _ in range(count):
            n += len(m.frontend_decoder.decode(sock.recv()).items)
        sock.send(str(n).encode())
    else:
        for _ in range(count):
            msg = m.frontend_decoder.decode(sock.recv())
            sock.send(m.encoder.encode(m.Abort(len(msg.items))))
    sock.recv()  # bye
    sock.close(linger=0)


def run(rows: int, count: int, mode: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        endpoint = f"ipc://{d}/t.sock"
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.SNDHWM, 0)  # as core/proc.py
        sock.bind(endpoint)
        p = mp.get_context("spawn").Process(target=peer, args=(endpoint, rows, count, mode))
        p.start()
        ident, _ = sock.recv_multipart()
        msg = outputs(rows)
        t0 = time.perf_counter()
        if mode == "stream":
            for _ in range(count):
                sock.send_multipart([ident, m.encoder.encode(msg)])
            sock.recv_multipart()
        else:
            for _ in range(count):
                sock.send_multipart([ident, m.encoder.encode(msg)])
                m.core_decoder.decode(sock.recv_multipart()[1])
        took = time.perf_counter() - t0
        sock.send_multipart([ident, b"bye"])
        p.join()
        sock.close(linger=0)
        return took / count


def codec(rows: int, count: int) -> tuple[float, float]:
    msg = outputs(rows)
    blob = m.encoder.encode(msg)
    t0 = time.perf_counter()
    for _ in range(count):
        m.encoder.encode(msg)
    t1 = time.perf_counter()
    for _ in range(count):
        m.frontend_decoder.decode(blob)
    t2 = time.perf_counter()
    return (t1 - t0) / count, (t2 - t1) / count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--out", help="write the results (markdown) here too")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    lines = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    submit = m.Submit(1, 7, list(range(200)), SamplingParams(180, temperature=0.0), True, True)
    blob = m.encoder.encode(submit)
    t0 = time.perf_counter()
    for _ in range(args.messages):
        m.core_decoder.decode(m.encoder.encode(submit))
    sub_us = (time.perf_counter() - t0) / args.messages * 1e6
    say(f"Submit (200-token prompt): {len(blob)} B, encode + decode {sub_us:.1f} us")
    say("")
    say("| rows per Outputs | bytes | encode us | decode us | streamed us/msg | round trip us |")
    say("|---|---|---|---|---|---|")
    for rows in args.rows:
        enc, dec = codec(rows, args.messages)
        n = max(1000, args.messages // max(1, rows // 8))
        streamed = run(rows, n, "stream")
        rtt = run(rows, min(n, 5000), "ping")
        say(f"| {rows} | {len(m.encoder.encode(outputs(rows)))} | {enc * 1e6:.1f} | {dec * 1e6:.1f} | "
            f"{streamed * 1e6:.1f} | {rtt * 1e6:.1f} |")
    if args.out:
        import datetime
        import shlex

        command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
        head = ["# Engine core transport: cost per message", "",
                f"Command: `{command}`  ",
                f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores; "
                f"load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f} (other jobs' load makes "
                "these upper bounds)", ""]
        with open(args.out, "w") as f:
            f.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
