"""How long a full garbage collection pauses an engine's process, before and after its startup
heap is frozen (core/startup_heap.py): a demo engine is built in this process (the engine
core's imports and objects), then ``gc.collect(2)`` is timed ``--repeats`` times, then again
after ``freeze_startup_heap()``.

    python bench/gc_pause.py --out bench/results/gc_pause_cpu.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "backend")]

from md_table import publish, table  # noqa: E402


def collect_ms(repeats: int) -> list[float]:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect(2)
        runs.append(1000 * (time.perf_counter() - t0))
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from tritonkv.config import EngineConfig
    from tritonkv.core.startup_heap import freeze_startup_heap
    from tritonkv.engine.factory import build_engine
    from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

    engine = build_engine(EngineConfig(checkpoint=ensure_demo_checkpoint(), device=args.device))
    gc.collect()  # the build's garbage goes first: the runs time the live heap alone
    tracked = len(gc.get_objects())
    before = collect_ms(args.repeats)
    frozen = freeze_startup_heap()
    after = collect_ms(args.repeats)
    rows = [[name, f"{n:,}", f"{statistics.median(r):.1f}", ", ".join(f"{x:.1f}" for x in r)]
            for name, n, r in (("before the freeze", tracked, before),
                               ("after freeze_startup_heap()", len(gc.get_objects()), after))]
    lines = [f"# A full garbage collection in an engine's process ({os.cpu_count()} cores, "
             f"{platform.processor() or platform.machine()}, Python {platform.python_version()})", "",
             f"`python bench/gc_pause.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"A demo engine ({args.device}) built in the process, then `gc.collect(2)` timed {args.repeats} "
             f"times; {frozen:,} objects frozen.", "",
             *table(["heap", "objects the collector scans", "median ms", "runs (ms)"], rows, right=(1, 2)), ""]
    publish(lines, args.out)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
