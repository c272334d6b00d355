"""The instance's heartbeat gauges, read by the supervisor (``server/supervisor.py``).

- ``tritonkv_engine_loops``: iterations of the engine core's loop so far (every frontend of
  a core reports the core's count). A healthy core finishes one per step while busy and at
  least one a second while idle (it waits at most 1 s for work), so a value that stops
  moving for longer than any step takes means the core is stuck;
- ``tritonkv_engine_failed``: 1 while this instance has no working engine core (it died or
  its engine failed); the instance answers requests at once with UNAVAILABLE until the next
  request starts or attaches a new core.

Both carry a ``pid`` label (the stub's process id) besides model and instance: the
supervisor watches processes, and an instance name outlives its process.
"""

from __future__ import annotations

import os

LOOPS = "tritonkv_engine_loops"
FAILED = "tritonkv_engine_failed"


class Heartbeat:
    """The two gauges, labelled with the model, instance and pid."""

    def __init__(self, pb_utils, labels: dict[str, str]):
        labels = {**labels, "pid": str(os.getpid())}
        kind = pb_utils.MetricFamily.GAUGE
        self._families = [  # keep the families referenced, or their metrics fail
            pb_utils.MetricFamily(name=LOOPS, description="engine loop iterations (one per step, at "
                                  "least one a second while idle)", kind=kind),
            pb_utils.MetricFamily(name=FAILED, description="1 once the engine thread died (the instance "
                                  "refuses every request)", kind=kind),
        ]
        self._loops, self._failed = (f.Metric(labels=labels) for f in self._families)

    def publish(self, loops: int, failed: bool) -> None:
        self._loops.set(float(loops))
        self._failed.set(1.0 if failed else 0.0)
