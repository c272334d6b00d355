"""The server's KV pool as Prometheus reports it, and the "back to baseline" check.

Baseline rule: every model instance reports ``tritonkv_kv_blocks_used`` 0 and
``tritonkv_live_sequences`` 0 once all conversations have ended. Cached blocks may remain:
they are the prefix cache, not a leak.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

POOL_GAUGES = ("tritonkv_kv_blocks_total", "tritonkv_kv_blocks_used", "tritonkv_kv_blocks_cached",
               "tritonkv_kv_blocks_free", "tritonkv_live_sequences")


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)] for every sample of a Prometheus text exposition (read
    by prometheus_client's parser; a counter's samples keep their ``_total`` name)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


@dataclass(frozen=True)
class PoolSnapshot:
    """Pool gauges per model instance: {instance: {gauge: value}}; the instance key is the
    ``instance`` label, else ``model``/``version``."""

    instances: dict[str, dict[str, float]]

    @classmethod
    def from_text(cls, text: str) -> "PoolSnapshot":
        samples = parse_prometheus(text)
        instances: dict[str, dict[str, float]] = {}
        for name in POOL_GAUGES:
            for labels, value in samples.get(name, []):
                key = labels.get("instance") or f"{labels.get('model', '?')}/{labels.get('version', '?')}"
                instances.setdefault(key, {})[name] = value
        return cls(instances)

    def total(self, gauge: str) -> float:
        return sum(v.get(gauge, 0.0) for v in self.instances.values())

    @property
    def at_baseline(self) -> bool:
        return bool(self.instances) and all(
            v.get("tritonkv_kv_blocks_used", 0) == 0 and v.get("tritonkv_live_sequences", 0) == 0
            for v in self.instances.values())

    def describe(self) -> str:
        rows = []
        for key, v in sorted(self.instances.items()):
            rows.append(f"{key}: used {v.get('tritonkv_kv_blocks_used', 0):g} "
                        f"live {v.get('tritonkv_live_sequences', 0):g} "
                        f"cached {v.get('tritonkv_kv_blocks_cached', 0):g} "
                        f"free {v.get('tritonkv_kv_blocks_free', 0):g} / {v.get('tritonkv_kv_blocks_total', 0):g}")
        return "; ".join(rows) or "no tritonkv pool metrics"


def fetch_metrics(metrics_url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as r:
        return r.read().decode()


def pool_snapshot(metrics_url: str) -> PoolSnapshot:
    return PoolSnapshot.from_text(fetch_metrics(metrics_url))


def wait_for_baseline(metrics_url: str, timeout_s: float = 30.0, poll_s: float = 0.5) -> PoolSnapshot:
    """Poll until the pool is at baseline; returns the last snapshot (check ``at_baseline``).
    The gauges trail the last response by up to one engine step and one metrics refresh."""
    deadline = time.monotonic() + timeout_s
    while True:
        snap = pool_snapshot(metrics_url)
        if snap.at_baseline or time.monotonic() >= deadline:
            return snap
        time.sleep(poll_s)
