"""A server's time-to-first-token stages (admit, queue, prefill, deliver: the backend's
server/first_token_stages.py says what each holds) read from its /metrics, and their means
over an interval: the difference of each stage's sum over the difference of the count,
every model instance summed."""

from __future__ import annotations

from tritonkv.server.first_token_stages import FIRST_TOKENS, STAGE_SECONDS, STAGES
from tritonkv_client.metrics import fetch_metrics, parse_prometheus

Snapshot = tuple[dict[str, float], int]  # (stage -> seconds summed, requests)


def stages_from_text(text: str) -> Snapshot:
    samples = parse_prometheus(text)
    sums = dict.fromkeys(STAGES, 0.0)
    for labels, value in samples.get(STAGE_SECONDS, []):
        if labels.get("stage") in sums:
            sums[labels["stage"]] += value
    return sums, int(sum(value for _, value in samples.get(FIRST_TOKENS, [])))


def read_stages(metrics_url: str) -> Snapshot:
    return stages_from_text(fetch_metrics(metrics_url))


def stage_means(before: Snapshot, after: Snapshot) -> dict[str, float] | None:
    """Each stage's mean in ms over the requests between two snapshots (None if none came)."""
    n = after[1] - before[1]
    if n <= 0:
        return None
    return {s: (after[0][s] - before[0][s]) / n * 1e3 for s in STAGES}
