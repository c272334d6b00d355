"""The served path with no model: tritonserver and its tritonkv frontends attached to a scripted
engine core that emits one token for every running request each ``--step-ms`` (a decode
step that costs nothing), so what is measured is the frontends, Triton and gRPC alone:
whether they keep up (1.00 token per response, TPOT = the step), the output rate they
sustain against the step's (requests x 1000 / step ms), and what they add to the time to
first token (the admit and deliver stages, server/first_token_stages.py).

    python bench/frontend_load.py --out bench/results/frontend_load_cpu.md

The scripted core is this project's ``EngineCore`` (core/proc.py: its socket, its I/O thread,
its ``Outputs`` per step) with ``ScriptedEngine`` in place of the engine; it takes the pool's
lock first, so the frontends attach to it instead of starting a core of their own. A request's
first token comes in the first step after the core accepted it. Tokens cycle through the demo
tokenizer's byte tokens (the frontends detokenise them as in service).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, os.path.join(ROOT, "client"), os.path.join(ROOT, "backend")):
    if path not in sys.path:
        sys.path.insert(0, path)

from md_table import publish, table  # noqa: E402

from tritonkv.engine.requests import TurnOutput  # noqa: E402
from tritonkv.server.process_tree import end_group  # noqa: E402

POOL = "frontend-load"


class ScriptedEngine:
    """What ``EngineCore`` uses of an ``Engine``: every running turn gets one token per step."""

    def __init__(self, step_s: float, checkpoint: str, vocab: int):
        self.step_s = step_s
        self.checkpoint, self.max_model_len, self.context_limit = checkpoint, 4096, 4096
        self.model_config = SimpleNamespace(vocab_size=vocab)
        self.pool = SimpleNamespace(num_blocks=1024)
        self.device = SimpleNamespace(type="cpu")
        self.failure = None
        self.after_emit = None
        self._commands = SimpleNamespace(qsize=lambda: 0)
        self._new: list = []  # (key, turn) accepted since the last step (any thread)
        self._turns: dict = {}  # request key -> turn state; the step thread's
        self._gone: list = []  # ("abort", key) / ("owner", owner) since the last step
        self._lock = threading.Lock()
        self._tokens = 0

    def submit_turn(self, corr_id, prompt_ids, params, emit, *, request_id=None, owner=None, error=None, **_):
        turn = SimpleNamespace(emit=emit, left=params.max_tokens, prompt=len(prompt_ids), owner=owner,
                               arrival=time.monotonic(), error=error)
        with self._lock:
            self._new.append((request_id, turn))

    def abort(self, request_id, kept_tokens=None, index=0) -> None:
        with self._lock:
            self._gone.append(("abort", request_id))

    def drop_owner(self, owner) -> None:
        with self._lock:
            self._gone.append(("owner", owner))

    def stats(self) -> dict[str, int]:
        return {"total": 1024, "used": 0, "cached": 0, "free": 1024, "generated_tokens": self._tokens}

    def request_counts(self) -> tuple[int, int]:
        return 0, len(self._turns)

    def start_loop(self) -> None:
        threading.Thread(target=self._loop, name="scripted-engine", daemon=True).start()

    def _loop(self) -> None:
        next_step = time.monotonic()
        while True:
            next_step += self.step_s
            self._step()
            self.after_emit()
            time.sleep(max(0.0, next_step - time.monotonic()))

    def _step(self) -> None:
        with self._lock:
            new, self._new = self._new, []
            gone, self._gone = self._gone, []
        for what, key in gone:
            for k in [k for k, t in self._turns.items() if (k == key if what == "abort" else t.owner == key)]:
                self._turns.pop(k).emit(TurnOutput("", [], True, "cancelled"))
        now = time.monotonic()
        for key, turn in new:
            if turn.error is not None:
                turn.emit(TurnOutput("", [], True, "error", error=turn.error))
            else:
                turn.scheduled = now
                self._turns[key] = turn
        for key, turn in list(self._turns.items()):
            turn.left -= 1
            done = turn.left <= 0
            out = TurnOutput("", [97 + self._tokens % 26], done, "length" if done else None, 0, turn.prompt)
            if not hasattr(turn, "sent"):
                turn.sent = True
                out.first_token_times = (turn.arrival, turn.scheduled, time.monotonic())
            self._tokens += 1
            if done:
                del self._turns[key]
            turn.emit(out)


def core_main(name: str, step_ms: float, checkpoint: str, vocab: int) -> int:
    """The scripted core's process: the pool's lock, then ``EngineCore`` until SIGTERM."""
    from tritonkv.config import EngineConfig
    from tritonkv.core import liveness, proc
    from tritonkv.core import messages as m
    from tritonkv.core.spawn import take_lock
    from tritonkv.core.runtime_dir import core_paths
    from tritonkv.server.stop_signals import StopSignals

    fd = take_lock(core_paths(name))
    if fd is None:
        raise SystemExit(f"a core named {name} runs already")
    proc.mismatch = lambda core, frontend: None  # any frontend settings attach

    class ScriptedCore(proc.EngineCore):
        def _load(self):
            self.engine = ScriptedEngine(step_ms / 1e3, checkpoint, vocab)
            self.engine.after_emit = self._after_iteration
            pid = os.getpid()
            self.welcome = m.Welcome(pid, liveness.start_time(pid), checkpoint, vocab, 4096, 4096, 1024, "float32", "cpu")

    core = ScriptedCore(name, EngineConfig(checkpoint=checkpoint, device="cpu"), False, 0, fd)
    StopSignals(core.stop)
    try:
        return core.run()
    finally:
        core.remove_files()


def measure(args) -> list[dict]:
    import json

    from served import project_env, served
    from serving_clients import run_level
    from serving_report import summarize
    from tritonkv.core.runtime_dir import core_name, core_paths
    from tritonkv.core.spawn import core_running
    from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
    from tritonkv_client.first_token_stages import read_stages, stage_means

    checkpoint = ensure_demo_checkpoint()
    with open(os.path.join(checkpoint, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prompts = [[1] + [65 + (i + j) % 26 for j in range(args.prompt_tokens - 1)] for i in range(max(args.concurrency))]
    rows = []
    for instances, step_ms in [(i, s) for i in args.instances for s in args.step_ms]:
        pool = f"{POOL}-{os.getpid()}"
        # the scripted core waits up to 120 s for its first frontend and leaves 120 s after the
        # last (a run cut short leaves it no longer than that); SIGTERM ends it at once
        env = project_env(TRITONKV_CORE_GRACE_S="120")
        name = core_name(pool, "cpu0")
        core = subprocess.Popen([sys.executable, __file__, "--core", name, "--core-step-ms",
                                 str(step_ms), "--core-checkpoint", checkpoint, "--core-vocab", str(vocab)],
                                env=env, start_new_session=True)
        try:
            # the frontends must find the scripted core, or they would start a real one
            deadline = time.monotonic() + 60
            while not (core_running(name) and os.path.exists(core_paths(name).socket)):
                if core.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the scripted core {name} did not start (exit code {core.poll()})")
                time.sleep(0.1)
            params = {"pool_name": pool, "device": "cpu", "stream_interval": 1}
            with served(checkpoint, instances=instances, params=params) as (url, _cmd, metrics):
                run_level(url, prompts[:4], 4, 8, 1)  # warm-up
                for c in args.concurrency:
                    before = read_stages(metrics)
                    samples, wall, _ = run_level(url, prompts[:c], c, args.max_tokens, args.client_procs)
                    if core.poll() is not None:
                        raise RuntimeError(f"the scripted core exited ({core.returncode}) during the level")
                    r = summarize(samples, wall)
                    time.sleep(1.2)  # the stage gauges go out twice a second
                    st = stage_means(before, read_stages(metrics)) or {}
                    rows.append({"instances": instances, "step_ms": step_ms, "c": c, "r": r, "stages": st,
                                 "ideal": c * 1e3 / step_ms})
                    print(f"{instances} instance(s), step {step_ms} ms c={c}: {r['output_tokens_per_s']:,.0f} tok/s of {c * 1e3 / step_ms:,.0f}, "
                          f"{r['tokens_per_response']:.2f} tokens/response, stages {st}", flush=True)
        finally:
            core.terminate()
            end_group(core, time.monotonic() + 30)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--step-ms", type=float, nargs="+", default=[7.0, 15.0])
    p.add_argument("--max-tokens", type=int, default=180)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--instances", type=int, nargs="+", default=[1],
                   help="Triton instances of each model (the clients use llm_stateless), one server per count")
    p.add_argument("--client-procs", type=int, default=max(1, min(16, (os.cpu_count() or 2) // 2)))
    p.add_argument("--out", default=None)
    p.add_argument("--core", help=argparse.SUPPRESS)  # the scripted core's own process
    p.add_argument("--core-step-ms", type=float, help=argparse.SUPPRESS)
    p.add_argument("--core-checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--core-vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.core:
        return core_main(args.core, args.core_step_ms, args.core_checkpoint, args.core_vocab)
    # SIGTERM / SIGHUP (a timeout, a closed terminal) unwind like Ctrl-C: the server and the
    # scripted core are stopped on the way out
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, frame: sys.exit(128 + number))
    rows = measure(args)
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"# The served path with no model: frontends, Triton and gRPC ({os.cpu_count()} cores, "
             f"{platform.processor() or platform.machine()})", "",
             f"`python bench/frontend_load.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"A scripted engine core emits one token per running request every step; {args.prompt_tokens} prompt "
             f"tokens, {args.max_tokens} output tokens, "
             f"{args.client_procs} client processes; one closed wave per level; instances: the server's "
             "Triton instances of each model (llm and llm_stateless); the clients use llm_stateless alone. Stages: means in ms "
             "(server/first_token_stages.py; queue and prefill are the script's one step).", "",
             *table(["instances", "step ms", "concurrency", "tok/s", "the step's tok/s", "ratio", "tokens / response",
                     "TPOT p50 ms", "TTFT p50 ms", "admit", "deliver"],
                    [[row["instances"], row["step_ms"], row["c"], f"{row['r']['output_tokens_per_s']:,.0f}", f"{row['ideal']:,.0f}",
                      f"{row['r']['output_tokens_per_s'] / row['ideal']:.2f}", f"{row['r']['tokens_per_response']:.2f}",
                      f(row["r"]["tpot_p50_ms"]), f(row["r"]["ttft_p50_ms"]), f(row["stages"].get("admit")),
                      f(row["stages"].get("deliver"))] for row in rows], right=tuple(range(11))), ""]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
