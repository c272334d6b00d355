"""Soak checks: while a long load runs, sample every ``period_s`` what must stay bounded —
KV blocks used and live sequences (the server's gauges), the resident memory and open files
of the server's process group (tritonserver and its Python-backend stubs) and its engine core.

Bounded means (``verdict``): live sequences never exceed ``max_live``; and from the first
sample after warm-up to the last, RSS grows by at most 25% + 64 MiB and open files by at most
32. The pool's return to baseline after the run is checked by run.py as for every load run.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass

from tritonkv_client.metrics import fetch_metrics, parse_prometheus

RSS_GROWTH = 1.25
RSS_SLACK = 64 * 2**20
FD_SLACK = 32


@dataclass
class Sample:
    t_s: float
    blocks_used: float
    live_sequences: float
    rss_bytes: int
    open_files: int


def group_pids(pgid: int) -> list[int]:
    """Live processes of a process group (the launcher starts the server in its own group),
    and their descendants in other sessions: the engine core a stub started (``core/spawn.py``,
    its own session), which holds the model and the KV pool."""
    from tritonkv.server.process_tree import live_group_members, tree_members

    return sorted(set(live_group_members(pgid)) | set(tree_members(pgid)))


def rss_and_files(pids: list[int]) -> tuple[int, int]:
    rss = files = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            files += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return rss, files


class SoakMonitor:
    def __init__(self, metrics_url: str, server_pgid: int | None, period_s: float):
        self.metrics_url = metrics_url
        self.pgid = server_pgid
        self.period_s = period_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "SoakMonitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()  # one more after the load: the pool has drained by now

    def sample(self) -> None:
        gauges = parse_prometheus(fetch_metrics(self.metrics_url))

        def total(name):
            # every instance reports its engine core's pool-wide count, and a server's
            # instances share one core (one pool per server): the count once, not a sum
            return max((v for _labels, v in gauges.get(name, [])), default=0.0)

        rss, files = rss_and_files(group_pids(self.pgid)) if self.pgid else (0, 0)
        self.samples.append(Sample(round(time.monotonic() - self._t0, 1), total("tritonkv_kv_blocks_used"),
                                   total("tritonkv_live_sequences"), rss, files))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - a failed sample is reported, not fatal
                print(f"soak sample failed: {e!r}", flush=True)

    def verdict(self, max_live: int) -> tuple[bool, list[str]]:
        problems = []
        if len(self.samples) < 3:
            return False, [f"only {len(self.samples)} samples: run longer than 2 periods"]
        worst_live = max(s.live_sequences for s in self.samples)
        if worst_live > max_live:
            problems.append(f"live sequences reached {worst_live:.0f} > {max_live}")
        if self.pgid:
            first, last = self.samples[1], self.samples[-1]  # samples[0] is during warm-up
            if last.rss_bytes > first.rss_bytes * RSS_GROWTH + RSS_SLACK:
                problems.append(f"RSS grew {first.rss_bytes / 2**20:.0f} -> {last.rss_bytes / 2**20:.0f} MiB")
            if last.open_files > first.open_files + FD_SLACK:
                problems.append(f"open files grew {first.open_files} -> {last.open_files}")
        return not problems, problems

    def table(self) -> str:
        lines = ["| t (s) | KV blocks used | live sequences | server RSS (MiB) | open files |",
                 "|---:|---:|---:|---:|---:|"]
        for s in self.samples:
            lines.append(f"| {s.t_s:.0f} | {s.blocks_used:.0f} | {s.live_sequences:.0f} | "
                         f"{s.rss_bytes / 2**20:.0f} | {s.open_files} |")
        return "\n".join(lines)

    def as_dicts(self) -> list[dict]:
        return [asdict(s) for s in self.samples]
