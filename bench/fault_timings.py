"""Fault, restart and stop timings of `tritonkv serve` as an operator meets them: the numbers
in docs/operations.md and docs/security.md come from this script's results file.

One `tritonkv serve` (demo model, this machine's CPU, one instance per model, supervisor with
``--stuck-after 4``, the test-only fault hooks of server/fault_injection.py armed through
``$TRITONKV_TEST_FAULT_DIR``), then, each timed from the moment of the fault:
start to ready; SIGSTOP of a stub and of the OpenAI frontend (readiness false); SIGKILL of a
stub with 4 HTTP streams and 1 gRPC turn in flight; an engine core that stops stepping; a
4.2 MB HTTP body (tritonserver 2.51 dies on it); an 8 MB text over gRPC (refused); 4,096
refused STARTs then a new conversation; SIGTERM with 3 conversations open, and that nothing
is left (processes, the engine core, /dev/shm, work folder); a bad flag's exit. Every
restart is checked with the greedy tokens served before the faults.

    python bench/fault_timings.py --out bench/results/fault_timings_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "e2e"), os.path.join(ROOT, "bench")]

from md_table import table  # noqa: E402
from polling import wait_until  # noqa: E402
from triton_calls import StreamClient, http_generate, inputs_for  # noqa: E402
from tritonkv.core.runtime_dir import core_pid  # noqa: E402
from tritonkv.server.ports import check_ports_free  # noqa: E402
from tritonkv.server.process_tree import live_group_members  # noqa: E402

PROMPT = [256, 72, 101, 108, 108, 111]
LONG = {"input_ids": [256, 65, 66, 67], "max_tokens": 1000, "ignore_eos": True, "temperature": 0.0, "stream": True}
STUCK_AFTER_S = 4
EXIT_TIMEOUT_S = 1.5


class Serve:
    def __init__(self, fault_dir: str):
        self.ports = check_ports_free("127.0.0.1", {f: 0 for f in ("http", "grpc", "metrics", "openai", "health")})
        cmd = [sys.executable, "-m", "tritonkv.server.cli", "serve", "--exit-timeout", str(EXIT_TIMEOUT_S),
               "--stuck-after", str(STUCK_AFTER_S)]
        for name, port in self.ports.items():
            cmd += [f"--{name}-port", str(port)]
        env = {**os.environ, "TRITONKV_TEST_FAULT_DIR": fault_dir}
        self.fault_dir = fault_dir
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.banner_at = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if line.strip().startswith("chat:"):
                self.banner_at = time.monotonic()

    @property
    def http(self):
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def grpc(self):
        return f"127.0.0.1:{self.ports['grpc']}"

    def ready(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['health']}/health/ready", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def groups(self) -> dict[str, int]:
        """Process groups serve started now: {"tritonserver": pgid, "openai": pgid}."""
        found = {}
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            with open(f"/proc/{self.proc.pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    cmd = cmdline(int(child))
                    found["openai" if "openai_frontend" in cmd else "tritonserver"] = int(child)
        return found

    def token(self) -> str:
        """The current tritonserver's region token (its private pool is server-<token>)."""
        return re.search(r"shm_region_tritonkv-([0-9a-f]{16})-", cmdline(self.groups()["tritonserver"])).group(1)

    def core(self) -> int:
        pid = core_pid(f"server-{self.token()}-cpu0")
        assert pid is not None
        return pid

    def stubs(self) -> list[int]:
        return [p for p in live_group_members(self.groups()["tritonserver"])
                if cmdline(p).split(" ")[0].endswith("triton_python_backend_stub")]

    def greedy(self):
        status, body = http_generate(self.http, "llm_stateless",
                                     {"input_ids": PROMPT, "max_tokens": 12, "temperature": 0.0})
        client = StreamClient(self.grpc)
        try:
            turn = client.turn(seq_id=777, start=True, end=True, ids=PROMPT, max_tokens=12, temperature=0.0)
        finally:
            client.close()
        return (body.get("output_ids") if status == 200 else None), turn.ids if turn.error is None else None

    def arm(self, kind: str, pid: int):
        open(os.path.join(self.fault_dir, f"{kind}-{pid}"), "w").close()


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class ReadyLog(threading.Thread):
    """/health/ready every 20 ms; ``first(status, after)``: when it first answered so."""

    def __init__(self, serve):
        super().__init__(daemon=True)
        self.serve, self.seen, self.done = serve, [], threading.Event()
        self.start()

    def run(self):
        while not self.done.wait(0.02):
            self.seen.append((time.monotonic(), self.serve.ready()))

    def first(self, status, after):
        return next((t for t, s in list(self.seen) if s == status and t >= after), None)


class InFlight(threading.Thread):
    """A long HTTP stream (or a gRPC turn); ``ended_at`` and ``outcome``."""

    def __init__(self, serve, grpc_seq=None):
        super().__init__(daemon=True)
        self.serve, self.grpc_seq = serve, grpc_seq
        self.first_event, self.ended_at, self.outcome = threading.Event(), None, None
        self.start()

    def run(self):
        try:
            if self.grpc_seq is not None:
                self.first_event.set()
                client = StreamClient(self.serve.grpc)
                try:
                    turn = client.turn(seq_id=self.grpc_seq, start=True, end=True, ids=LONG["input_ids"],
                                       max_tokens=1000, ignore_eos=True, temperature=0.0, timeout=120)
                finally:
                    client.close()
                self.outcome = f"error: {turn.error}" if turn.error else "finished"
                return
            req = urllib.request.Request(f"http://{self.serve.http}/v2/models/llm_stateless/generate_stream",
                                         data=json.dumps(LONG).encode(), method="POST")
            outcome = "error: ended without a final event"
            with urllib.request.urlopen(req, timeout=120) as r:
                for line in r:
                    if line.startswith(b"data: "):
                        self.first_event.set()
                        event = json.loads(line[6:])
                        if "error" in event or event.get("finish_reason"):
                            outcome = f"error: {event['error']}" if "error" in event else "finished"
                            break
            self.outcome = outcome
        except Exception as exc:  # noqa: BLE001 - whatever ended it is the outcome
            self.outcome = f"error: {type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            self.first_event.set()


def recovery(serve, reference, fault_at, inflight, log) -> dict:
    """Seconds from the fault to: the in-flight requests' ends, readiness false, readiness
    true, the first right greedy answer; and whether everything matched."""
    for r in inflight:
        r.join(90)
    assert wait_until(lambda: log.first(503, fault_at) is not None, 60), "readiness never went false"
    unready = log.first(503, fault_at)
    assert wait_until(lambda: log.first(200, unready) is not None, 180), "readiness never came back"
    ready = log.first(200, unready)
    right = serve.greedy() == reference
    restored = time.monotonic()
    ends = [r.ended_at - fault_at for r in inflight]
    return {"in-flight ended": f"{min(ends):.2f}-{max(ends):.2f} s ({sum(r.outcome != 'finished' for r in inflight)}"
                               f"/{len(inflight)} with an error)" if inflight else "-",
            "readiness false": f"{unready - fault_at:.2f} s", "readiness true": f"{ready - fault_at:.2f} s",
            "right tokens again": f"{restored - fault_at:.2f} s" + ("" if right else " (WRONG TOKENS)")}


def run(out_path: str, command: str) -> None:
    rows: list[tuple[str, dict]] = []
    notes: list[str] = []
    load_before = os.getloadavg()
    fault_dir = tempfile.mkdtemp(prefix="tritonkv-faults-")
    serve = Serve(fault_dir)
    try:
        assert wait_until(lambda: serve.banner_at is not None or serve.proc.poll() is not None, 600, 0.1)
        assert serve.banner_at is not None, "\n".join(serve.lines)
        notes.append(f"start to the ready banner: {serve.banner_at - serve.started:.1f} s; progress lines: "
                     + "; ".join(f"`{line}`" for line in serve.lines if re.search(r"\(\d+ s\)$", line)))
        assert wait_until(lambda: serve.ready() == 200, 30)
        reference = serve.greedy()
        assert None not in reference

        for what, victim in (("a stub", serve.stubs()[0]), ("the OpenAI frontend", serve.groups()["openai"])):
            os.kill(victim, signal.SIGSTOP)
            t0 = time.monotonic()
            wait_until(lambda: serve.ready() == 503, 10, 0.01)
            took = time.monotonic() - t0
            os.kill(victim, signal.SIGCONT)
            assert wait_until(lambda: serve.ready() == 200, 60, 0.05)
            rows.append((f"SIGSTOP of {what} (then SIGCONT)", {"readiness false": f"{took:.2f} s"}))

        # SIGKILL of a stub while 4 HTTP streams and a gRPC turn are in flight (core slowed)
        serve.arm("slow", serve.core())
        inflight = [InFlight(serve) for _ in range(4)]
        assert all(r.first_event.wait(60) and r.outcome is None for r in inflight), [r.outcome for r in inflight]
        inflight.append(InFlight(serve, grpc_seq=4242))
        time.sleep(0.5)  # the gRPC turn reaches the engine (no event reaches this client before the end)
        log = ReadyLog(serve)
        stub = next(p for p in serve.stubs() if "llm_stateless" in cmdline(p))
        t0 = time.monotonic()
        os.kill(stub, signal.SIGKILL)
        rows.append(("SIGKILL of a stub (4 HTTP streams + 1 gRPC turn in flight)",
                     recovery(serve, reference, t0, inflight, log)))
        log.done.set()

        # an engine core that stops stepping (2 streams in flight)
        core = serve.core()
        serve.arm("slow", core)
        inflight = [InFlight(serve) for _ in range(2)]
        assert all(r.first_event.wait(60) and r.outcome is None for r in inflight), [r.outcome for r in inflight]
        log = ReadyLog(serve)
        t0 = time.monotonic()
        serve.arm("hang", core)
        rows.append((f"engine core stuck (`--stuck-after {STUCK_AFTER_S}`, 2 HTTP streams in flight)",
                     recovery(serve, reference, t0, inflight, log)))
        log.done.set()

        # a 4.2 MB HTTP body: tritonserver 2.51 dies (SIGSEGV) before any model code runs
        log = ReadyLog(serve)
        body = json.dumps({"text_input": "a" * 4_200_000, "max_tokens": 1}).encode()
        old = serve.groups()["tritonserver"]
        t0 = time.monotonic()
        try:
            urllib.request.urlopen(urllib.request.Request(
                f"http://{serve.http}/v2/models/llm_stateless/generate", data=body, method="POST"), timeout=60)
        except (OSError, http.client.HTTPException) as exc:
            notes.append(f"the 4.2 MB POST got: {type(exc).__name__}: {str(exc)[:120]}")
        crashed = wait_until(lambda: not live_group_members(old) or serve.groups().get("tritonserver") != old, 30)
        rows.append(("4.2 MB HTTP body to Triton's HTTP port" + ("" if crashed else " (server did NOT die)"),
                     recovery(serve, reference, t0, [], log)))
        log.done.set()

        # an 8 MB text over gRPC: refused by tritonkv
        client = StreamClient(serve.grpc, model="llm_stateless")
        try:
            t0 = time.monotonic()
            turn = client.turn(text="a" * 8_000_000, max_tokens=1, timeout=60)
            took = time.monotonic() - t0
        finally:
            client.close()
        notes.append(f"8 MB `text_input` over gRPC: answered in {took * 1000:.0f} ms with "
                     f"`{(turn.error or 'NO ERROR')[:140]}`")

        # 4,096 refused STARTs (out-of-vocabulary ids) on one stream, no END; then a new conversation
        import queue

        import tritonclient.grpc as grpcclient

        bad = grpcclient.InferenceServerClient(serve.grpc)
        answers: queue.Queue = queue.Queue()
        bad.start_stream(callback=lambda result, error: answers.put(error))
        t0 = time.monotonic()
        for i in range(4096):
            bad.async_stream_infer("llm", inputs_for(ids=[10**9], max_tokens=1), sequence_id=10_000 + i,
                                   sequence_start=True, enable_empty_final_response=True)
        refused = sum(answers.get(timeout=120) is not None for _ in range(4096))
        sent = time.monotonic() - t0
        bad.stop_stream()
        bad.close()
        t0 = time.monotonic()
        client = StreamClient(serve.grpc)
        try:
            turn = client.turn(seq_id=7, start=True, end=True, ids=[256, 65], max_tokens=2, temperature=0.0)
        finally:
            client.close()
        notes.append(f"4,096 STARTs with out-of-vocabulary ids sent and answered in {sent:.2f} s ({refused} "
                     f"refused); then a new conversation's turn answered in {time.monotonic() - t0:.2f} s "
                     f"({'ok' if turn.error is None and len(turn.ids) == 2 else turn.error})")
        with open(f"/proc/{serve.groups()['tritonserver']}/status") as f:
            rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
        notes.append(f"tritonserver's RSS (`llm`: 65,536 candidate sequences per instance): {rss / 1024:.0f} MB")

        # SIGTERM with three conversations open: how long serve takes, and what is left
        clients = [StreamClient(serve.grpc) for _ in range(3)]
        for i, c in enumerate(clients):
            assert c.turn(seq_id=77 + i, start=True, ids=[256, 65], max_tokens=2, temperature=0.0).error is None
        groups, token = list(serve.groups().values()), serve.token()
        core = serve.core()
        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        code = serve.proc.wait(60)
        took = time.monotonic() - t0
        left = [p for g in groups for p in live_group_members(g)] + ([core] if cmdline(core) else [])
        shm = [n for n in os.listdir("/dev/shm") if token in n]
        for c in clients:
            c.close()
        rows.append(("SIGTERM of serve, 3 conversations open (`--exit-timeout 1.5`)",
                     {"serve exited": f"{took:.2f} s (code {code}); processes left: {left or 'none'}; "
                                      f"/dev/shm files left: {shm or 'none'}"}))
        notes.append("serve's own lines at the stop: " + "; ".join(
            f"`{line}`" for line in serve.lines if line.startswith("tritonkv: stop")))
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait()
        subprocess.run(["rm", "-rf", fault_dir])

    t0 = time.monotonic()
    bad_flag = subprocess.run([sys.executable, "-m", "tritonkv.server.cli", "serve", "--block-size", "12"],
                              capture_output=True, text=True)
    notes.append(f"`tritonkv serve --block-size 12`: exit {bad_flag.returncode} after "
                 f"{time.monotonic() - t0:.2f} s: `{bad_flag.stderr.strip().splitlines()[-1]}`")
    write(out_path, command, rows, notes, load_before)


def write(path, command, rows, notes, load_before):
    columns = ["in-flight ended", "readiness false", "readiness true", "right tokens again", "serve exited"]
    lines = [
        "# Fault, restart and stop timings of `tritonkv serve` (CPU, demo model)", "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores; "
        f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (the machine is shared: "
        "other jobs' load lengthens model loads, hence the restart times)", "",
        "Times from the fault (one instance per model; the supervisor polls every 0.25 s; a restart "
        "stops the server like a normal stop, then loads the models again):", "",
        *table(["fault", *columns], [[label, *(values.get(c, "-") for c in columns)] for label, values in rows]),
        "", *[f"- {n}" for n in notes], ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "fault_timings_cpu.md"))
    args = ap.parse_args()
    run(args.out, "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]))


if __name__ == "__main__":
    main()
