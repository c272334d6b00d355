"""`tritonkv serve`: prints its endpoints, serves, and stops cleanly on SIGTERM."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from polling import wait_until
from triton_calls import http_generate
from tritonkv.server.launcher import free_port, live_group_members


BACKEND = os.path.join(os.path.dirname(__file__), "..", "..", "backend")


def start_serve(*args):
    """``tritonkv serve`` on free ports; returns the process, its banner and its ports."""
    ports = {name: free_port() for name in ("http", "grpc", "metrics", "openai", "health")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tritonkv.server.cli", "serve", "--http-port", str(ports["http"]),
         "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]),
         "--openai-port", str(ports["openai"]), "--health-port", str(ports["health"]), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": BACKEND})
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip().startswith("chat:"):
            break
    return proc, "".join(lines), ports


def stop_serve(proc, port):
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert time.monotonic() - t0 < 5
    # the server is gone: nothing listens on its port (SO_REUSEADDR skips TIME_WAIT only)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def pool_files(pool):
    """The socket and lock of the pool's engine core (gone a grace period after its server)."""
    from tritonkv.core.runtime_dir import runtime_dir

    return sorted(f for f in os.listdir(runtime_dir()) if f.startswith(f"{pool}-"))


def test_two_serves_at_once_both_answer_and_a_load_failure_says_why():
    """Two ``tritonkv serve`` side by side (a private pool each unless one is named); engine
    settings as flags and as --param; a third that names the first one's pool with another geometry fails
    with the reason in one line; a stop removes the work folder and the pool files."""
    import openai

    shared = f"clishared{os.getpid()}"
    servers, others = [], []
    try:
        servers.append(start_serve("--pool-name", shared, "--kv-cache-memory-mb", "32", "--model-name", "first"))
        servers.append(start_serve("--kv-cache-memory-mb", "48", "--param", "max_num_seqs=8",
                                   "--no-enable-prefix-caching"))
        texts = []
        for (proc, banner, ports), name in zip(servers, ("first", "tritonkv-demo")):
            assert f"http://127.0.0.1:{ports['http']}" in banner and f"127.0.0.1:{ports['grpc']}" in banner
            assert f"http://127.0.0.1:{ports['metrics']}/metrics" in banner and "curl" in banner
            assert f"OpenAI  http://127.0.0.1:{ports['openai']}/v1  (model {name})" in banner
            assert "restricted (launcher only): shared-memory, model-repository, logging, trace" in banner
            code, body = http_generate(f"127.0.0.1:{ports['http']}", "llm_stateless",
                                       {"text_input": "Hi", "max_tokens": 3, "temperature": 0})
            assert code == 200 and body["finish_reason"] == "length"
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['openai']}/v1", api_key="-", max_retries=0)
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0)
            texts.append(r.choices[0].message.content)
            assert r.usage.completion_tokens == 4
        assert texts[0] == texts[1]  # one model, greedy: the same answer from both servers
        # the flags reached the engine settings of both models
        for model in ("llm", "llm_stateless"):
            with urllib.request.urlopen(f"http://127.0.0.1:{servers[1][2]['http']}/v2/models/{model}/config") as r:
                params = {k: v["string_value"] for k, v in json.load(r)["parameters"].items()}
            assert params["kv_cache_memory_mb"] == "48" and params["max_num_seqs"] == "8"
            assert params["enable_prefix_caching"] == "false" and re.fullmatch(r"server-[0-9a-f]{16}", params["pool_name"])
            private = params["pool_name"]
        assert pool_files(shared) and pool_files(private)
        workdirs = [re.search(r"log\s+(\S+)/server.log", banner).group(1) for _, banner, _ in servers]
        assert all(os.path.isdir(w) for w in workdirs)

        failed, banner, _ = start_serve("--pool-name", shared, "--kv-cache-memory-mb", "64")
        others.append(failed)
        assert failed.wait(timeout=120) == 1
        err = failed.stderr.read().strip().splitlines()
        print(err[-1])
        assert len(err) == 1 and err[0].startswith("tritonkv serve: tritonserver exited with code 1: model "), err
        assert "pool" in err[0].lower() and "Traceback" not in err[0]

        for proc, _, ports in servers:
            stop_serve(proc, ports["openai"])
        assert not any(os.path.exists(w) for w in workdirs)
        assert wait_until(lambda: pool_files(shared) == [] and pool_files(private) == [], 15)
    finally:
        for proc in [p for p, _, _ in servers] + others:  # SIGTERM: serve stops its tritonserver (SIGKILL orphans it)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_stop_with_open_conversations_is_fast_and_a_crash_is_cleaned_by_the_next_launch():
    """Item 7: a stop with conversations open takes < 3 s and leaves no stub, no pool files
    and no Python backend regions; the regions a crashed server left are removed by the next
    launch, and only those (another server's, or a name this launcher does not make, stay)."""
    import fcntl
    import uuid

    from triton_calls import StreamClient
    from tritonkv.server.launcher import REGION_DIR, REGION_TAG, launch, server_regions, start_server

    pool = f"stoptest{os.getpid()}"
    params = {"pool_name": pool, "kv_cache_memory_mb": "32"}
    # names the next launch must leave alone: the default prefix (any tritonserver), and a
    # region of a "live" server of this launcher (its lock held here)
    foreign = os.path.join(REGION_DIR, f"triton_python_backend_shm_region_{uuid.uuid4()}")
    live_token = "0123456789abcdef"
    live_region = os.path.join(REGION_DIR, f"{REGION_TAG}{live_token}-{uuid.uuid4()}")
    live_lock = os.path.join(REGION_DIR, f"{REGION_TAG}{live_token}.lock")
    for path in (foreign, live_region, live_lock):
        open(path, "w").close()
    lock_fd = os.open(live_lock, os.O_RDWR)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        crashed = launch(extra_params=params)
        client = StreamClient(crashed.grpc_url)
        assert client.turn(seq_id=11, start=True, ids=[256, 65], max_tokens=2).error is None
        client.close()
        left = server_regions(crashed.region_token)
        assert len(left) >= 3, left  # a region per stub, and the lock
        os.killpg(crashed.process.pid, signal.SIGKILL)  # a crash: nobody cleans up
        crashed.process.wait()
        deadline = time.monotonic() + 10
        while live_group_members(crashed.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        crashed_lock = os.open(os.path.join(REGION_DIR, f"{REGION_TAG}{crashed.region_token}.lock"), os.O_RDWR)
        while time.monotonic() < deadline:  # the killed stubs' last threads close their files
            try:
                fcntl.flock(crashed_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        os.close(crashed_lock)  # (releases it again)
        assert server_regions(crashed.region_token) == left

        with start_server(extra_params=params) as server:
            assert server_regions(crashed.region_token) == []  # the crashed server's, removed
            assert all(os.path.exists(p) for p in (foreign, live_region, live_lock))
            mine = server_regions(server.region_token)
            assert len(mine) >= 3, mine
            clients = [StreamClient(server.grpc_url) for _ in range(3)]
            for i, c in enumerate(clients):  # conversations left open (no END)
                t = c.turn(seq_id=77 + i, start=True, ids=[256, 65], max_tokens=2, temperature=0.0)
                assert t.error is None and len(t.ids) == 2
            group = server.process.pid
            t0 = time.monotonic()
            server.stop()
            took = time.monotonic() - t0
            for c in clients:
                c.close()
        print(f"stop with 3 open conversations: {took:.2f}s")
        assert took < 3.0, took
        assert live_group_members(group) == []  # the stubs of the model that did not unload are gone
        assert server_regions(server.region_token) == []
        assert wait_until(lambda: not pool_files(pool), 15)
        assert not os.path.exists(server.workdir) and not os.path.exists(crashed.workdir)
    finally:
        os.close(lock_fd)
        for path in (foreign, live_region, live_lock):
            if os.path.exists(path):
                os.remove(path)


def test_serve_has_a_flag_for_every_engine_setting_with_its_comment_as_help(capsys):
    """The flags are generated from EngineConfig: every field but the positional checkpoint,
    its comment as help (end of line, or the lines above), values as config.pbtxt strings."""
    import dataclasses

    import pytest

    from tritonkv.config import EngineConfig
    from tritonkv.server import cli

    comments = cli.field_comments(EngineConfig)
    assert comments["block_size"] == "tokens per KV block"
    assert comments["gpu_memory_utilization"].startswith("CUDA: > 0 sizes the KV pool")  # the lines above it
    parser = cli.argparse.ArgumentParser()
    names = cli.add_engine_flags(parser)
    assert names == [f.name for f in dataclasses.fields(EngineConfig) if f.name != "checkpoint"]
    args = parser.parse_args(["--kv-cache-memory-mb", "64", "--no-enable-prefix-caching", "--pool-name", "p1",
                              "--gpu-memory-utilization", "0.5"])
    args.param = ["stream_interval=2"]
    assert cli.engine_params(args, names, parser) == {
        "stream_interval": "2", "kv_cache_memory_mb": "64", "enable_prefix_caching": "false", "pool_name": "p1",
        "gpu_memory_utilization": "0.5"}
    help_text = parser.format_help()
    assert "--block-size INT" in help_text and "tokens per KV block" in help_text
    with pytest.raises(SystemExit):
        cli.main(["serve", "--block-size", "16", "--param", "block_size=8"])
    assert "block_size given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--max-num-seqs", "many"])
    assert "--max-num-seqs: invalid int value: 'many'" in capsys.readouterr().err


def test_failure_reason_is_the_first_line_of_tritons_message():
    from tritonkv.server.launcher import failure_reason

    log = ("I1201 10:00:00.0 1 server.cc:1] started\n"
           "E1201 10:00:01.0 1 model_lifecycle.cc:654] \"failed to load 'llm' version 1: Internal: "
           "PoolMismatch: KV pool 'p-cpu0' is in use with 341 blocks; this instance wants 682\\n\\nAt:\\n  "
           "/x/engine.py(28): <module>\\n\"\n"
           "E1201 10:00:02.0 1 server.cc:2] exiting\n")
    assert failure_reason(log) == ("model 'llm' failed to load: Internal: PoolMismatch: KV pool 'p-cpu0' is in "
                                   "use with 341 blocks; this instance wants 682")
    assert failure_reason("I1201 all fine\n") is None
