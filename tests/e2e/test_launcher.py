"""`tritonkv serve` as a user runs it: honest about its ports and readiness, stopped whole by
every signal and by its parent's death, leaving nothing behind; its flags checked before
anything starts."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest

from polling import wait_until
from triton_calls import StreamClient, http_generate
from tritonkv.core.runtime_dir import runtime_dir
from tritonkv.server.ports import port_free
from tritonkv.server.process_tree import live_group_members, process_stat

BACKEND = os.path.join(os.path.dirname(__file__), "..", "..", "backend")
ENV = {**os.environ, "PYTHONPATH": BACKEND}
EXIT_TIMEOUT_S = 1.5


def serve_cmd(ports, *args):
    return [sys.executable, "-m", "tritonkv.server.cli", "serve", "--http-port", str(ports["http"]),
            "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]),
            "--openai-port", str(ports["openai"]), "--health-port", str(ports["health"]),
            "--exit-timeout", str(EXIT_TIMEOUT_S), *args]


def free_ports():
    from tritonkv.server.ports import check_ports_free

    chosen = check_ports_free("127.0.0.1", {n: 0 for n in ("http", "grpc", "metrics", "openai", "health")})
    return chosen


def read_banner(stream, deadline_s=300):
    lines = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if line.strip().startswith("chat:"):
            break
    return "".join(lines)


def tree_of(pid):
    """Process groups started by ``pid`` (any of its threads): tritonserver's, the frontend's."""
    groups = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            groups.update(int(c) for c in f.read().split())
    return groups


def health(port, path="/health/ready"):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def core_processes(token):
    """Live engine core processes of the private pool of the server with region ``token``
    (``tritonkv-core server-<token>-cpu0`` once named, ``--name server-<token>-...`` before)."""
    pool = f"server-{token}-".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            words = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").split()
        except OSError:
            continue
        if (words[:1] == [b"tritonkv-core"] or b"tritonkv.core" in words) and any(w.startswith(pool) for w in words):
            found.append(int(entry))
    return found


def workdir_token(workdir):
    return re.search(r"tritonkv-server-([0-9a-f]{16})-", workdir).group(1)


def assert_nothing_left(groups, ports, workdir):
    """Called right after serve exited: its pool's engine core is already gone (no wait)."""
    token = workdir_token(workdir)
    assert core_processes(token) == [], "the engine core outlived serve"
    assert not [n for n in os.listdir(runtime_dir()) if n.startswith(f"server-{token}-")], "core files left"
    assert wait_until(lambda: all(live_group_members(g) == [] for g in groups), 10), "a process outlived serve"
    assert all(port_free("127.0.0.1", p) for p in ports.values()), "a port is still held"
    assert not os.path.exists(workdir), "the work folder is left"
    assert not [n for n in os.listdir("/dev/shm") if token in n], "something of it is left in /dev/shm"


def test_serve_is_honest_about_ports_and_readiness_and_sighup_stops_everything():
    """One serve: its banner; a second serve on its gRPC port fails at once naming the flag
    (no false "ready"); readiness turns false within 5 s of a SIGSTOPped stub or frontend
    and back; SIGHUP (a closed terminal) with three conversations open stops the whole tree
    within the exit timeout + 1 s and leaves no process, port, /dev/shm file or work folder."""
    import openai

    ports = free_ports()
    proc = subprocess.Popen(serve_cmd(ports, "--stateless-model-name", "vllm_model"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        banner = read_banner(proc.stdout)
        assert "tritonkv ready (models llm, vllm_model;" in banner, banner
        assert f"OpenAI  http://127.0.0.1:{ports['openai']}/v1  (model tritonkv-demo)" in banner
        assert re.search(r"tokenizer \S*demo\S*  \(aiperf --tokenizer", banner), banner
        assert "restricted (nobody): shared-memory, model-repository, logging, trace" in banner
        assert "models load first" in banner  # progress lines while the models loaded
        assert re.search(r"tritonkv: KV capacity: .+ \(\d+ s\)", banner) and "tritonkv: model llm loaded (" in banner
        workdir = re.search(r"log\s+(\S+)/server.log", banner).group(1)
        code, body = http_generate(f"127.0.0.1:{ports['http']}", "vllm_model",
                                   {"text_input": "Hi", "max_tokens": 3, "temperature": 0})
        assert code == 200 and body["finish_reason"] == "length"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['openai']}/v1", api_key="-", max_retries=0)
        r = client.chat.completions.create(model="tritonkv-demo", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4

        t0 = time.monotonic()
        second = subprocess.run(serve_cmd({**free_ports(), "grpc": ports["grpc"]}), capture_output=True,
                                text=True, env=ENV, timeout=60)
        took = time.monotonic() - t0
        assert second.returncode == 1 and "tritonkv ready" not in second.stdout
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"tritonkv serve: --grpc-port {ports['grpc']}: "), err
        assert "starting tritonserver" not in second.stdout  # refused before anything started
        print(f"a serve on a taken port exited 1 after {took:.2f}s")

        groups = tree_of(proc.pid)
        assert len(groups) == 2  # tritonserver and the OpenAI frontend
        assert health(ports["health"]) == (200, {"ready": True, "reason": ""})
        stubs = [p for g in groups for p in live_group_members(g)
                 if os.path.basename(open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[0])
                 == b"triton_python_backend_stub"]
        assert len(stubs) == 2  # one instance of each model
        frontend = next(g for g in groups if b"openai_frontend" in open(f"/proc/{g}/cmdline", "rb").read())
        for victim in (stubs[0], frontend):
            os.kill(victim, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                assert wait_until(lambda: health(ports["health"])[0] == 503, 5, 0.1), "still ready"
                print(f"not ready {time.monotonic() - t0:.2f}s after SIGSTOP of {victim}: "
                      f"{health(ports['health'])[1]['reason']}")
            finally:
                os.kill(victim, signal.SIGCONT)
            assert wait_until(lambda: health(ports["health"])[0] == 200, 30, 0.1)

        assert len(core_processes(workdir_token(workdir))) == 1  # the pool's engine core runs
        clients = [StreamClient(f"127.0.0.1:{ports['grpc']}") for _ in range(3)]
        for i, c in enumerate(clients):  # conversations left open (no END)
            t = c.turn(seq_id=77 + i, start=True, ids=[256, 65], max_tokens=2, temperature=0.0)
            assert t.error is None and len(t.ids) == 2
        t0 = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == 0
        took = time.monotonic() - t0
        for c in clients:
            c.close()
        out = proc.stdout.read()
        print(f"serve stopped {took:.2f}s after SIGHUP with 3 open conversations:\n{out}")
        assert "tritonkv: stopping (SIGHUP)" in out and "tritonkv: stopped in" in out
        assert took < EXIT_TIMEOUT_S + 1.0, took
        assert_nothing_left(groups, ports, workdir)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def test_the_death_of_serves_parent_stops_the_whole_tree(tmp_path):
    """serve's parent is SIGKILLed (no cleanup code of its own runs): serve is told by the
    kernel (SIGTERM) and stops everything it started, leaving nothing behind."""
    ports = free_ports()
    out = tmp_path / "serve.out"
    wrapper = textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen({serve_cmd(ports, '--no-openai')!r}, stdout=open({str(out)!r}, "w"),
                             stderr=subprocess.STDOUT)
        print(p.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", wrapper], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        serve_pid = int(parent.stdout.readline())
        assert wait_until(lambda: "chat:" in out.read_text(), 300, 0.2), out.read_text()
        workdir = re.search(r"log\s+(\S+)/server.log", out.read_text()).group(1)
        groups = tree_of(serve_pid)
        assert len(groups) == 1
        assert len(core_processes(workdir_token(workdir))) == 1
        parent.kill()
        parent.wait()
        assert wait_until(lambda: process_stat(serve_pid) is None or process_stat(serve_pid)[0] == "Z", 30, 0.1)
        assert "tritonkv: stopping (SIGTERM)" in out.read_text()
        ports.pop("openai")
        assert_nothing_left(groups, ports, workdir)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_sigint_stops_serve_and_its_engine_core():
    """Ctrl-C: serve returns only once everything it started is gone, the engine core of its
    private pool included (left alone, a core exits its grace period after its last frontend)."""
    ports = free_ports()
    proc = subprocess.Popen(serve_cmd(ports, "--no-openai"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        banner = read_banner(proc.stdout)
        workdir = re.search(r"log\s+(\S+)/server.log", banner).group(1)
        groups = tree_of(proc.pid)
        assert len(core_processes(workdir_token(workdir))) == 1, banner
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "tritonkv: stopping (SIGINT)" in out, out
        ports.pop("openai")
        assert_nothing_left(groups, ports, workdir)
        print(out)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def test_bad_flags_exit_before_anything_starts_naming_the_flag_and_the_allowed_values():
    """Checked before the launch (nothing is started: no progress line); the time is printed,
    not asserted (speed belongs to benchmarks): about 0.5 s on an idle machine."""
    cases = {
        ("--kv-cache-dtype", "fp4"): "argument --kv-cache-dtype: invalid choice: 'fp4' (choose from 'auto', 'fp8', "
                                     "'int8')",
        ("--block-size", "12"): "--block-size: parameter 'block_size' = 12: must be a positive power of two",
        ("--kv-eviction", "h2o", "--kv-window", "64"): "--heavy-hitter-tokens",
        ("--param", "kv_window=-1"): "--param kv_window=...: parameter 'kv_window' = -1: must be >= 0 tokens",
        ("--param", "no_such=1"): "unknown parameter 'no_such'; known: ",
        ("--http-port", "70000"): "argument --http-port: 70000 is not a port",
        ("--stateless-model-name", "a/b"): "argument --stateless-model-name",
        ("--restricted-api", "shm"): "unknown API 'shm'",
        ("/no/such/checkpoint",): "CHECKPOINT '/no/such/checkpoint': no such file or directory",
    }
    for args, words in cases.items():
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "tritonkv.server.cli", "serve", *args], capture_output=True,
                           text=True, env=ENV, timeout=30)
        took = time.monotonic() - t0
        assert p.returncode == 2 and words in p.stderr, (args, p.stderr[-500:])
        assert p.stdout == "", p.stdout  # not even "starting tritonserver"
        print(f"{' '.join(args)}: exit 2 after {took:.2f}s")


def test_serve_has_a_flag_with_help_for_every_setting(capsys):
    """Engine flags come from EngineConfig (its comment as help, enums with their choices);
    every flag of serve has help text."""
    import argparse
    import dataclasses

    from tritonkv.config import EngineConfig
    from tritonkv.server import cli

    comments = cli.field_comments(EngineConfig)
    assert comments["block_size"] == "tokens per KV block"
    assert comments["gpu_memory_utilization"].startswith("CUDA: > 0 sizes the KV pool")  # the lines above it
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    serve, names = cli.add_serve_parser(sub)
    assert names == [f.name for f in dataclasses.fields(EngineConfig) if f.name != "checkpoint"]
    for action in serve._actions:
        assert action.help, action.option_strings
    assert {a.dest: a.choices for a in serve._actions if a.choices} == {
        "engine_device": ("auto", "cpu", "cuda"), "engine_dtype": ("auto", "float32", "bfloat16", "float16"),
        "engine_kv_cache_dtype": ("auto", "fp8", "int8"), "engine_kv_eviction": ("none", "streaming", "h2o"),
        "tool_call_parser": ["hermes", "llama3_json"]}
    help_text = serve.format_help()
    assert "0: a free port" in help_text and "--block-size INT" in help_text
    args = serve.parse_args(["--kv-cache-memory-mb", "64", "--no-enable-prefix-caching", "--pool-name", "p1",
                             "--gpu-memory-utilization", "0.5"])
    args.param = ["stream_interval=2"]
    assert cli.engine_params(args, names, serve) == {
        "stream_interval": "2", "kv_cache_memory_mb": "64", "enable_prefix_caching": "false", "pool_name": "p1",
        "gpu_memory_utilization": "0.5"}
    with pytest.raises(SystemExit):
        cli.main(["serve", "--block-size", "16", "--param", "block_size=8"])
    assert "block_size given twice" in capsys.readouterr().err


def test_failure_reason_is_the_first_line_of_tritons_message():
    from tritonkv.server.probes import failure_reason

    log = ("I1201 10:00:00.0 1 server.cc:1] started\n"
           "E1201 10:00:01.0 1 model_lifecycle.cc:654] \"failed to load 'llm' version 1: Internal: "
           "PoolMismatch: KV pool 'p-cpu0' is in use with 341 blocks; this instance wants 682\\n\\nAt:\\n  "
           "/x/engine.py(28): <module>\\n\"\n"
           "E1201 10:00:02.0 1 server.cc:2] exiting\n")
    assert failure_reason(log) == ("model 'llm' failed to load: Internal: PoolMismatch: KV pool 'p-cpu0' is in "
                                   "use with 341 blocks; this instance wants 682")
    assert failure_reason("I1201 all fine\n") is None


def test_failure_reason_carries_the_line_an_exited_core_logged():
    """The server log goes with the work folder when a start fails: the reason names why the
    core exited (its own error line), not only that it did."""
    from tritonkv.server.probes import failure_reason

    log = ("tritonkv INFO: KV pool: 682 blocks x 16 tokens (kv_cache_memory_mb)\n"
           "tritonkv ERROR: engine core p-cuda0: the engine loop has not come round for 5 s and no frontend "
           "is attached, exiting\n"
           "E1201 10:00:01.0 1 model_lifecycle.cc:654] \"failed to load 'llm_stateless' version 1: Internal: "
           "CoreUnavailable: the engine core for pool 'p-cuda0' exited while starting (exit code 0; see the "
           "server log for why)\\n\\nAt:\\n\"\n")
    assert failure_reason(log) == (
        "model 'llm_stateless' failed to load: Internal: CoreUnavailable: the engine core for pool 'p-cuda0' "
        "exited while starting (exit code 0; see the server log for why) (the core logged: engine core "
        "p-cuda0: the engine loop has not come round for 5 s and no frontend is attached, exiting)")
