"""Where a step's time goes, summed per kind of step (decode through a CUDA graph, eager
decode, prefill or mixed), for benchmarks and logs. Host phases: schedule, prepare (inputs),
forward (launch), sample (launch), wait (blocked on the GPU for the step's ids), emit (apply
tokens, build and queue outputs). With overlap, a step's wait and emit happen while the GPU
runs the next step, so the phases of consecutive steps interleave."""

from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("schedule", "prepare", "forward", "sample", "wait", "emit")


@dataclass
class PhaseSums:
    steps: int = 0
    seqs: int = 0
    tokens: int = 0
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


class StepBreakdown:
    def __init__(self):
        self.kinds: dict[str, PhaseSums] = {}

    def add(self, num_seqs: int, num_tokens: int, schedule_s: float, runner_times, wait_s: float,
            emit_s: float) -> None:
        """``runner_times``: the runner's ``StepTimes`` of this step's launch."""
        if num_tokens == num_seqs:
            kind = "decode_graph" if runner_times.graph else "decode_eager"
        else:
            kind = "prefill_or_mixed"
        sums = self.kinds.setdefault(kind, PhaseSums())
        sums.steps += 1
        sums.seqs += num_seqs
        sums.tokens += num_tokens
        values = (schedule_s, runner_times.prepare, runner_times.forward, runner_times.sample, wait_s, emit_s)
        for name, value in zip(PHASES, values):
            sums.seconds[name] += value

    def summary(self) -> dict[str, dict]:
        """Per kind: steps, mean batch, and mean milliseconds per step of each phase."""
        out = {}
        for kind, s in self.kinds.items():
            out[kind] = {"steps": s.steps, "mean_seqs": s.seqs / s.steps,
                         **{f"{p}_ms": 1000 * s.seconds[p] / s.steps for p in PHASES}}
            out[kind]["total_ms"] = sum(out[kind][f"{p}_ms"] for p in PHASES)
        return out

    def reset(self) -> None:
        self.kinds.clear()
