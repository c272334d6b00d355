"""Where a request's time to first token goes, as its frontend sees it: four stages that add up
to the time from the frontend taking the request (``execute``) to its first response sent.
Triton's own queue and the network, before and after, are outside them.

- admit: taken -> the engine accepted the turn (parse, tokenise, the frontend's I/O thread,
  the socket to the core);
- queue: accepted -> first in a step (the scheduler's budget, other prefills, admission);
- prefill: first in a step -> its first token emitted (the steps computing the prompt; for
  n > 1, from the first step of the prompt its samples share; a turn preempted before its
  first token counts the wait and the recompute here);
- deliver: emitted -> the first response sent (the core's I/O thread, the socket, the
  frontend's backlog, detokenising, Triton's send).

Rules:
- The engine stamps the times it owns on the turn's first output (``TurnOutput.
  first_token_times``, monotonic: one clock for every process of the host); the frontend adds
  its own two and sums each stage. Streamed requests only (one answered whole sends nothing
  before its end); outputs without tokens (errors, cancels) add nothing.
- Published as gauges of sums in seconds and a count (``FirstTokenGauges``: ``STAGE_SECONDS``,
  ``FIRST_TOKENS``), as the sums of vLLM's request_queue_time / request_prefill_time
  histograms: a stage's mean over an interval is its sum's difference over the count's
  (tritonkv_client/first_token_stages.py). Sums rather than histograms: each Triton metric
  update is a round trip to the server process, too dear per request; these go out with the
  other gauges, twice a second.
"""

from __future__ import annotations

import threading

STAGES = ("admit", "queue", "prefill", "deliver")
STAGE_SECONDS = "tritonkv_first_token_stage_seconds_total"  # label stage
FIRST_TOKENS = "tritonkv_first_token_requests_total"


class FirstTokenStages:
    def __init__(self):
        self.sums = dict.fromkeys(STAGES, 0.0)
        self.count = 0
        self._lock = threading.Lock()

    def add(self, taken: float, times: tuple[float, float, float], sent: float) -> None:
        """One request's first response: ``taken`` and ``sent`` by the frontend, ``times`` =
        (arrival, scheduled, emitted) by the engine."""
        arrival, scheduled, emitted = times
        with self._lock:
            self.sums["admit"] += arrival - taken
            self.sums["queue"] += scheduled - arrival
            self.sums["prefill"] += emitted - scheduled
            self.sums["deliver"] += sent - emitted
            self.count += 1

    def snapshot(self) -> tuple[dict[str, float], int]:
        with self._lock:
            return dict(self.sums), self.count


class FirstTokenGauges:
    """The instance's stage sums and count as Triton gauges (labelled like ``Gauges``)."""

    def __init__(self, pb_utils, labels: dict[str, str]):
        kind = pb_utils.MetricFamily.GAUGE
        self._families = [
            pb_utils.MetricFamily(name=STAGE_SECONDS, kind=kind,
                                  description="seconds spent in each stage before the first response, summed over "
                                              "requests: admit, queue, prefill, deliver (docs/operations.md)"),
            pb_utils.MetricFamily(name=FIRST_TOKENS, kind=kind,
                                  description="requests whose first response (with tokens) was sent"),
        ]
        self._stage = {s: self._families[0].Metric(labels={**labels, "stage": s}) for s in STAGES}
        self._count = self._families[1].Metric(labels=labels)

    def publish(self, stages: FirstTokenStages) -> None:
        sums, count = stages.snapshot()
        for s, metric in self._stage.items():
            metric.set(sums[s])
        self._count.set(float(count))
