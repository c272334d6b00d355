"""Issue 21's fresh adversarial pass against one running `tritonkv serve` (loopback only,
bounded request counts). Prints a table: probe | expected | observed | verdict.

    python bench/adversarial_probe.py --serve-pid PID --http H:P --grpc H:P --metrics URL \
        --openai URL --health URL [--other-user probe_user] [--destructive]
    python bench/adversarial_probe.py --lifecycle        # probe 10: starts serve 3 times itself

Four greedy multi-turn gRPC conversations are run once alone (reference) and again while the
probes run; they must give the same tokens. "Another local user" is --other-user (created by
the caller, e.g. `useradd -m probe_user`); its commands run through `runuser`.
--destructive adds the probes that kill or stop processes (2, 11, 9), run after the others.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import psutil
import tritonclient.grpc as grpcclient

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "e2e"))
from triton_calls import StreamClient, inputs_for, metric_values, wait_for_pool_baseline  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []


def row(probe, expected, observed, ok):
    ROWS.append((probe, expected, observed, ok if isinstance(ok, str) else "PASS" if ok else "FAIL"))
    print(f"[{ROWS[-1][3]}] {probe}: {observed}", flush=True)


def as_user(user, *cmd, timeout=20):
    p = subprocess.run(["runuser", "-u", user, "--", *cmd], capture_output=True, text=True, timeout=timeout)
    return p.returncode, (p.stdout + p.stderr).strip()


def post(url, body, headers=None, timeout=120):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def get(url, headers=None, timeout=5):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except OSError as e:
        return None, repr(e)


def descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def procs(serve_pid, needle):
    out = []
    for p in descendants(serve_pid):
        try:
            if needle in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def stream_once(grpc_url, model, inputs, parameters=None, timeout=120):
    """One request on a gRPC stream (the models are decoupled); returns (output_ids, error)."""
    c = StreamClient(grpc_url, model)
    try:
        turn = c.send(inputs, timeout=timeout, parameters=parameters)
    finally:
        c.close()
    return turn.ids, turn.error


# ---- conversations ---------------------------------------------------------------------------
PROMPTS = [["Tell me about the sea.", "And the sky?", "Why?"],
           ["List three colours.", "Now three animals.", "One more."],
           ["Count: one, two,", "Continue counting.", "Backwards now."],
           ["Hello there.", "What is your name?", "Goodbye."]]


def conversation(grpc_url, seq_id, prompts):
    c = StreamClient(grpc_url, "llm")
    out = []
    try:
        for i, p in enumerate(prompts):
            t = c.turn(seq_id, start=i == 0, end=i == len(prompts) - 1, text=p, max_tokens=12,
                       temperature=0.0, timeout=180)
            out.append(t.error if t.error else tuple(t.ids))
    finally:
        c.close()
    return out


def run_conversations(grpc_url, base_id):
    results = [None] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, conversation(grpc_url, base_id + i, PROMPTS[i]))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---- probes ------------------------------------------------------------------------------------
def probe1_files(a, user):
    core = procs(a.serve_pid, "tritonkv-core") or procs(a.serve_pid, "tritonkv.core")
    rdir = None
    if core:
        rdir = core[0].environ().get("TRITONKV_RUNTIME_DIR")
    rdir = rdir or f"/tmp/tritonkv-{os.getuid()}"
    bad = []
    st = os.lstat(rdir)
    if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.getuid() or stat.S_ISLNK(st.st_mode):
        bad.append(f"{rdir} mode {oct(st.st_mode)}")
    names = [n for n in os.listdir(rdir) if n.startswith(a.pool)]
    for n in names:
        m = stat.S_IMODE(os.lstat(os.path.join(rdir, n)).st_mode)
        if m & 0o077:
            bad.append(f"{n} {oct(m)}")
    rc_ls, out_ls = as_user(user, "ls", rdir)
    rc_plant, out_plant = as_user(user, "ln", "-s", "/etc/passwd", os.path.join(rdir, "planted"))
    if rc_ls == 0:
        bad.append(f"{user} lists {rdir}")
    if rc_plant == 0:
        bad.append(f"{user} planted a link in {rdir}")
    # the server's files in /dev/shm and /tmp (by token): readable by the other user?
    token = a.token
    shm = [f for f in glob.glob("/dev/shm/*") if token in f]
    for f in shm:
        rc, _ = as_user(user, "head", "-c", "1", f)
        if rc == 0:
            bad.append(f"{user} reads {f}")
    work = glob.glob(f"/tmp/tritonkv-server-{token}-*")
    for w in work:
        rc, _ = as_user(user, "ls", w)
        if rc == 0:
            bad.append(f"{user} lists {w}")
    # regions in the host's /dev/shm (they belong in the server's private tmpfs)
    regions = [f for f in glob.glob(f"/dev/shm/triton_python_backend_shm_region_tritonkv-{token}-*")]
    if regions:
        bad.append(f"{len(regions)} regions in host /dev/shm")
    # a socket connect attempt by the other user
    sock = [os.path.join(rdir, n) for n in names if n.endswith(".sock")]
    for s in sock:
        rc, out = as_user(user, "python3", "-c",
                          f"import socket;s=socket.socket(socket.AF_UNIX);s.connect({s!r});print('connected')")
        if rc == 0:
            bad.append(f"{user} connected to {s}")
    row("1 files: runtime dir, socket, lock, /dev/shm, /tmp",
        "0700 dir, 0600 files, nothing listable/linkable/readable by another user",
        f"runtime dir {rdir} {oct(stat.S_IMODE(st.st_mode))} uid {st.st_uid}; files {names}; "
        f"host /dev/shm files of token: {[os.path.basename(f) for f in shm]}; work dirs {len(work)}; "
        f"{user}: ls rc={rc_ls}, ln rc={rc_plant}; " + ("; ".join(bad) if bad else "nothing reachable"),
        not bad)


def probe3_deep(a):
    deep = "[" * 100_000 + "]" * 100_000
    body = {"text_input": "Hi", "sampling_parameters": '{"stop": ' + deep + "}", "stream": False}
    t0 = time.monotonic()
    code, text = post(f"http://{a.http}/v2/models/llm_stateless/generate", body)
    dt = time.monotonic() - t0
    ok = code == 400 and "sampling_parameters" in text and "nested" in text
    row("3 sampling_parameters nested 100k deep (HTTP generate)", "400 naming sampling_parameters",
        f"{code} {text[:140]!r} in {dt:.2f}s", ok)
    # the same over gRPC, and an OpenAI body nested 100k deep
    ins = inputs_for(text="Hi")
    t = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    t.set_data_from_numpy(np.array([body["sampling_parameters"].encode()], dtype=np.object_))
    _, err = stream_once(a.grpc, "llm_stateless", ins + [t])
    err = err or "no error"
    row("3b sampling_parameters nested 100k deep (gRPC)", "INVALID_ARG naming sampling_parameters",
        err[:160], "sampling_parameters" in err and "nested" in err)
    code, text = post(f"{a.openai}/chat/completions",
                      b'{"model":"tritonkv-demo","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    row("3c OpenAI chat body nested 100k deep", "4xx, server keeps serving", f"{code} {text[:140]!r}",
        code is not None and 400 <= code < 500)


def probe4_topk(a):
    _, err = stream_once(a.grpc, "llm_stateless", inputs_for(text="Hi", max_tokens=2), {"top_k": 1e20})
    err = err or "no error"
    row("4 top_k=1e20 over Triton gRPC (parameter)", "INVALID_ARG naming top_k; others unaffected",
        err[:160], "top_k" in err and "internal" not in err.lower())
    code, text = post(f"http://{a.http}/v2/models/llm_stateless/generate",
                      {"text_input": "Hi", "max_tokens": 2, "top_k": 1e20})
    # (tritonserver's own JSON-to-tensor conversion refuses a float for an int field with 500,
    # before tritonkv sees it: docs/security.md "Malformed HTTP requests")
    row("4b top_k=1e20 over Triton HTTP generate", "400 naming top_k, or Triton's own refusal",
        f"{code} {text[:140]!r}", (code == 400 and "top_k" in text) or (code == 500 and "Unable to parse" in text))
    for v in (2 ** 32 + 1, 2 ** 31):
        code, text = post(f"{a.openai}/completions", {"model": "tritonkv-demo", "prompt": "x", "max_tokens": 2,
                                                      "top_k": v})
        row(f"4c top_k={v} over OpenAI", "400 naming top_k (not cast)", f"{code} {text[:160]!r}",
            code == 400 and "top_k" in text and "-2147483648" not in text)
    # the instance still serves
    code, text = post(f"http://{a.http}/v2/models/llm_stateless/generate", {"text_input": "Hi", "max_tokens": 2})
    row("4d instance serves after the top_k probes", "200", f"{code}", code == 200)


def probe5_double_start(a):
    stop = threading.Event()
    prefill_done = []

    def long_prefill():  # another client's long prefill, repeated while the probe runs
        rng = np.random.default_rng(0)
        while not stop.is_set():
            ids = rng.integers(3, 255, 1500).tolist()  # fresh ids each time: no prefix-cache hit
            t0 = time.monotonic()
            _, err = stream_once(a.grpc, "llm_stateless",
                                 inputs_for(ids=ids, max_tokens=1))
            prefill_done.append(err or round(time.monotonic() - t0, 2))

    th = threading.Thread(target=long_prefill)
    th.start()
    time.sleep(0.3)
    answers: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(a.grpc)
    c.start_stream(callback=lambda result, error: answers.put((result, error)))

    def send(sid, start=False, end=False, ids=None):
        c.async_stream_infer("llm", inputs_for(ids=ids, max_tokens=1) if ids else [], sequence_id=sid,
                             sequence_start=start, sequence_end=end, enable_empty_final_response=True)

    def collect(n):
        errs = []
        for _ in range(n):
            _, e = answers.get(timeout=120)
            errs.append(None if e is None else str(e))
        return errs

    n = 20
    base = 770_000 + 1000 * (os.getpid() % 100)
    for i in range(n):
        send(base + i, start=True, ids=[256, 65, 66])
        send(base + i, start=True, ids=[256, 67])
    first = collect(2 * n)
    refused = [e for e in first if e]
    for i in range(n):
        send(base + i, ids=[68])
    second = collect(n)
    for i in range(n):
        send(base + i, end=True)
    collect(n)
    c.stop_stream()
    c.close()
    stop.set()
    th.join()
    ended = sum(1 for e in second if e)
    row("5 START,START on one id x20 beside a 1,500-token prefill",
        "20 second STARTs refused 'already live'; 20/20 first conversations go on",
        f"refused {len(refused)} (e.g. {refused[:1]}); next turn failed on {ended}/20 "
        f"({[e[:60] for e in second if e][:2]}); 1,500-token prefills during the probe: {prefill_done}",
        len(refused) == n and all("already live" in e for e in refused) and ended == 0)


def probe6_admin_key(a, user):
    tpid = [p for p in descendants(a.serve_pid) if p.name() == "tritonserver"]
    rc, cmd = as_user(user, "cat", f"/proc/{tpid[0].pid}/cmdline")
    args = cmd.split("\0")
    key_args = [x for x in args if "restricted" in x]
    key = None
    for x in key_args:
        if "tritonkv-admin-key=" in x:
            key = x.split("tritonkv-admin-key=", 1)[1]
    tried = []
    if key is not None:
        for k in (key, key.strip()):
            hdr = {"tritonkv-admin-key": k}
            try:
                tried.append(("http index", post(f"http://{a.http}/v2/repository/index", {}, hdr, timeout=5)[0]))
            except Exception as e:  # noqa: BLE001
                tried.append(("http index", type(e).__name__))
            try:
                tried.append(("http shm", get(f"http://{a.http}/v2/systemsharedmemory/status", hdr)[0]))
            except Exception as e:  # noqa: BLE001
                tried.append(("http shm", type(e).__name__))
            for name, call in (("grpc index", lambda cl, h: cl.get_model_repository_index(headers=h)),
                               ("grpc shm", lambda cl, h: cl.get_system_shared_memory_status(headers=h))):
                cl = grpcclient.InferenceServerClient(a.grpc)
                try:
                    call(cl, {"triton-grpc-protocol-tritonkv-admin-key": k})
                    tried.append((name, "OK"))
                except Exception as e:  # noqa: BLE001
                    tried.append((name, str(e)[:50]))
                cl.close()
    opened = [t for t in tried if t[1] in (200, "OK")]
    row("6 admin key from /proc/<tritonserver>/cmdline used by another user",
        "key unusable (restricted APIs closed to everyone)",
        f"{user} read cmdline rc={rc}, key {'found' if key else 'absent'} "
        f"(ends in newline: {key is not None and key.endswith(chr(10))}); tries {tried}", not opened)


def probe7_salt(a):
    prompt = "Salt probe %d: " % os.getpid() + "every full block of this text is cached " * 4

    def cached(salt):
        body = {"model": "tritonkv-demo", "prompt": prompt, "max_tokens": 2, "temperature": 0}
        if salt:
            body["cache_salt"] = salt
        code, text = post(f"{a.openai}/completions", body)
        if code != 200:
            return f"{code} {text[:80]}"
        return (json.loads(text)["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")

    got = {"alice": cached("alice"), "alice again": cached("alice"), "bob": cached("bob"), "no salt": cached(None)}
    ok = got["alice"] == 0 and isinstance(got["alice again"], int) and got["alice again"] > 0 \
        and got["bob"] == 0 and got["no salt"] == 0
    row("7 OpenAI cache_salt isolation", "bob/unsalted see cached_tokens 0; alice's repeat > 0",
        f"cached_tokens {got}", ok)


def sse_stream(openai_url, body, gaps, done):
    host, port = openai_url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    last = time.monotonic()
    for line in r:
        if line.startswith(b"data: ") and b"[DONE]" not in line:
            now = time.monotonic()
            gaps.append(now - last)
            last = now
    conn.close()
    done.set()


def probe8_big_chat(a):
    gaps: list[float] = []
    done = threading.Event()
    body = {"model": "tritonkv-demo", "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    th = threading.Thread(target=sse_stream, args=(a.openai, body, gaps, done))
    th.start()
    while len(gaps) < 20 and not done.is_set():
        time.sleep(0.05)
    before = list(gaps[5:])
    n_before = len(gaps)
    big = {"model": "tritonkv-demo", "messages": [{"role": "user", "content": "a " * 5_000_000}], "max_tokens": 2}
    t0 = time.monotonic()
    code, text = post(f"{a.openai}/chat/completions", big)
    dt = time.monotonic() - t0
    time.sleep(0.5)
    during = gaps[n_before:]
    th.join()
    base = float(np.median(before)) if before else float("nan")
    worst = max(during) if during else float("nan")
    ok = code in (400, 413) and dt < 0.5 and worst < max(0.5, 5 * base)
    row("8 10 MB chat message beside a stream", "refused in < 0.5 s; the stream keeps its pace",
        f"{code} {text[:90]!r} in {dt:.3f}s; stream gap median {base * 1000:.0f} ms before, "
        f"worst {worst * 1000:.0f} ms during/after", ok)


def wait_ready(a, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        code, _ = get(f"{a.health}/health/ready", timeout=2)
        if code == 200:
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def time_until_not_ready(a, limit=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        code, text = get(f"{a.health}/health/ready", timeout=2)
        if code != 200:
            return time.monotonic() - t0, text[:100]
        time.sleep(0.05)
    return None, "stayed 200"


def probe11_ready(a):
    code, text = get(f"{a.health}/health/ready")
    row("11a /health/ready body names the OpenAI frontend", "200 and covers OpenAI", f"{code} {text[:140]!r}",
        code == 200)
    for label, needle in (("stub", "triton_python_backend_stub"), ("engine core", "tritonkv-core"),
                          ("OpenAI frontend", "openai")):
        ps = procs(a.serve_pid, needle)
        if not ps:
            row(f"11 SIGSTOP {label}", "not ready within 5 s", f"no process matching {needle!r}", False)
            continue
        p = ps[0]
        p.send_signal(signal.SIGSTOP)
        try:
            dt, why = time_until_not_ready(a)
        finally:
            p.send_signal(signal.SIGCONT)
        back = wait_ready(a)
        row(f"11 SIGSTOP {label} (pid {p.pid})", "/health/ready false within 5 s; ready again after SIGCONT",
            f"not ready after {dt if dt is None else round(dt, 2)} s ({why!r}); ready again after "
            f"{back if back is None else round(back, 1)} s", dt is not None and dt < 5 and back is not None)
    import importlib.metadata as md
    v = md.version("jinja2")
    row("11 jinja2 version", ">= 3.1.6", v, tuple(int(x) for x in v.split(".")[:3]) >= (3, 1, 6))


def probe2_regions(a, user):
    """kill -9 a stub; during the reload window look for regions in the host's /dev/shm and try to
    read them as the other user."""
    stub = procs(a.serve_pid, "triton_python_backend_stub")
    seen, readable = set(), set()
    t0 = time.monotonic()
    stub[0].kill()
    ready_after = None
    while time.monotonic() - t0 < 90:
        for f in glob.glob("/dev/shm/triton_python_backend_shm_region*"):
            if a.token in f and not f.endswith(".lock"):
                seen.add(f)
                if f not in readable and as_user(user, "head", "-c", "1", f)[0] == 0:
                    readable.add(f)
        code, _ = get(f"{a.health}/health/ready", timeout=1)
        if code == 200 and time.monotonic() - t0 > 1:
            ready_after = time.monotonic() - t0
            break
        time.sleep(0.1)
    # the regions in the server's private tmpfs: the other user through /proc/<stub>/root
    stub2 = procs(a.serve_pid, "triton_python_backend_stub")
    rc, out = (None, "no stub")
    if stub2:
        rc, out = as_user(user, "ls", f"/proc/{stub2[0].pid}/root/dev/shm/")
    row("2 Python backend regions during a supervisor restart (stub kill -9)",
        "no region in host /dev/shm; none readable by another user",
        f"ready again after {ready_after and round(ready_after, 1)} s; regions seen in host /dev/shm: {len(seen)}; "
        f"readable by {user}: {len(readable)}; {user} ls /proc/<stub>/root/dev/shm rc={rc} {out[:60]!r}",
        not readable and not seen and rc != 0)


BIG_BODIES = ("10 MB of whitespace in {}", "10 MB text_input", "curl 10 MB text_input, no Expect",
              "curl 10 MB text_input")


def probe9_big_body(a, kind):
    bodies = {"10 MB of whitespace in {}": b"{" + b" " * 10_000_000 + b"}",
              "10 MB text_input": json.dumps({"text_input": "a " * 5_000_000, "max_tokens": 2}).encode()}
    ts_before = [p.pid for p in descendants(a.serve_pid) if p.name() == "tritonserver"]
    url = f"http://{a.http}/v2/models/llm_stateless/generate"
    t0 = time.monotonic()
    if kind.startswith("curl"):  # curl sends 'Expect: 100-continue' for a large body (urllib does not)
        path = "/tmp/adversarial_probe_body.json"
        with open(path, "wb") as f:
            f.write(bodies["10 MB text_input"])
        extra = ["-H", "Expect:"] if "no Expect" in kind else []
        p = subprocess.run(["curl", "-s", "-m", "30", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                            *extra, "--data-binary", f"@{path}", url], capture_output=True, text=True)
        os.unlink(path)
        what = f"curl rc={p.returncode} http_code={p.stdout}"
    else:
        try:
            code, text = post(url, bodies[kind], timeout=30)
            what = f"{code} {text[:80]!r}"
        except Exception as e:  # noqa: BLE001
            what = type(e).__name__ + " " + str(e)[:60]
    dt = time.monotonic() - t0
    time.sleep(1.0)
    t1 = time.monotonic()
    serving = None
    while time.monotonic() - t1 < 120:
        try:
            code, _ = post(f"http://{a.http}/v2/models/llm_stateless/generate", {"text_input": "Hi", "max_tokens": 2},
                           timeout=5)
            if code == 200:
                serving = time.monotonic() - t0
                break
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.2)
    ts_after = [p.pid for p in descendants(a.serve_pid) if p.name() == "tritonserver"]
    row(f"9 {kind} POSTed to Triton's HTTP /generate", "known 2.51 crash unless mitigated; serving again",
        f"{what} after {dt:.2f}s; tritonserver pid {ts_before} -> {ts_after}; serving again "
        f"{serving and round(serving, 1)} s after the POST",
        "FAIL" if serving is None else "CRASH (known 2.51, recovered)" if ts_before != ts_after else "PASS")


def lifecycle():
    """probe 10: serve's exit time after SIGTERM / SIGHUP / SIGINT, and what is left."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        before_shm = set(os.listdir("/dev/shm"))
        before_tmp = set(os.listdir("/tmp"))
        p = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "tritonkv"), "serve", "--http-port", "0", "--grpc-port", "0",
                              "--metrics-port", "0", "--openai-port", "0", "--health-port", "0",
                              "--pool-name", f"h9life{sig}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
        lines = []
        for line in p.stdout:
            lines.append(line)
            if "supervisor: ready" in line or p.poll() is not None:
                break
        ports = [int(x) for x in __import__("re").findall(r"127\.0\.0\.1:(\d+)", "".join(lines))]
        kids = {c.pid: c.name() for c in descendants(p.pid)}
        time.sleep(1.0)
        t0 = time.monotonic()
        p.send_signal(sig)
        p.wait(timeout=60)
        dt = time.monotonic() - t0

        def alive_now():
            out = []
            for k, name in kids.items():
                try:
                    if psutil.Process(k).status() != psutil.STATUS_ZOMBIE:
                        out.append(f"{k} {name}")
                except psutil.NoSuchProcess:
                    pass
            return out

        at_exit = alive_now()
        last_alive = 0.0
        while time.monotonic() - t0 - dt < 3.0:
            if alive_now():
                last_alive = time.monotonic() - t0 - dt
            time.sleep(0.05)
        alive = alive_now()
        listening = sorted({c.laddr.port for c in psutil.net_connections("tcp")
                            if c.status == psutil.CONN_LISTEN and c.laddr.port in ports})
        new_shm = set(os.listdir("/dev/shm")) - before_shm
        new_tmp = {x for x in set(os.listdir("/tmp")) - before_tmp if x.startswith("tritonkv")}
        rdir = f"/tmp/tritonkv-{os.getuid()}"
        in_rdir = [x for x in os.listdir(rdir) if x.startswith(f"h9life{sig}")] if os.path.isdir(rdir) else []
        left = [x for x in (alive, listening, new_shm, new_tmp, in_rdir) if x]
        row(f"10 serve exit after {sig.name}", "< exit-timeout (1.5) + 1 s; nothing left",
            f"exit {dt:.2f} s rc={p.returncode}; children {sorted(kids.values())}; alive at serve's exit "
            f"{at_exit} (last seen {last_alive:.2f} s after), 3 s later {alive}; ports listening {listening}; new /dev/shm {sorted(new_shm)}; "
            f"new /tmp/tritonkv* {sorted(new_tmp)}; runtime dir {in_rdir}", dt < 2.5 and not left)
        for k in alive:
            os.kill(int(k.split()[0]), signal.SIGKILL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve-pid", type=int)
    ap.add_argument("--http")
    ap.add_argument("--grpc")
    ap.add_argument("--metrics")
    ap.add_argument("--openai")
    ap.add_argument("--health")
    ap.add_argument("--pool", default="h9probe")
    ap.add_argument("--other-user", default="probe_user")
    ap.add_argument("--destructive", action="store_true")
    ap.add_argument("--lifecycle", action="store_true")
    ap.add_argument("--only", help="comma-separated probe numbers (5, 9) run alone, e.g. to repeat one")
    a = ap.parse_args()
    if a.lifecycle:
        lifecycle()
    elif a.only:
        a.token = ""
        for n in a.only.split(","):
            {"5": lambda: probe5_double_start(a),
             "9": lambda: [(probe9_big_body(a, k), wait_ready(a)) for k in BIG_BODIES]}[n]()
    else:
        ts = [p for p in descendants(a.serve_pid) if p.name() == "tritonserver"][0]
        a.token = [x for x in ts.cmdline() if "shm-region-prefix-name" in x][0].split("tritonkv-")[1].rstrip("-")
        reference = run_conversations(a.grpc, 910_000)
        results: dict = {}
        convs = threading.Thread(target=lambda: results.update(
            r1=run_conversations(a.grpc, 920_000), r2=run_conversations(a.grpc, 930_000)))
        convs.start()
        probe1_files(a, a.other_user)
        probe3_deep(a)
        probe4_topk(a)
        probe5_double_start(a)
        probe6_admin_key(a, a.other_user)
        probe7_salt(a)
        probe8_big_chat(a)
        convs.join()
        exact = [results[k] == reference for k in ("r1", "r2")]
        row("conversations: 4 greedy 3-turn, twice beside probes 1-8", "same tokens as alone",
            f"exact: {exact}; errors: {[t for r in results.values() for c in r for t in c if isinstance(t, str)][:2]}",
            all(exact) and not any(isinstance(t, str) for c in reference for t in c))
        base = wait_for_pool_baseline(a.metrics, timeout=15)
        row("pool at baseline after probes 1-8", "tritonkv_kv_blocks_used 0, live 0",
            f"used {metric_values(a.metrics, 'tritonkv_kv_blocks_used')}, "
            f"live {metric_values(a.metrics, 'tritonkv_live_sequences')}", base)
        if a.destructive:
            probe11_ready(a)
            probe2_regions(a, a.other_user)
            for kind in BIG_BODIES:
                probe9_big_body(a, kind)
                wait_ready(a)
            wait_ready(a)
            after = run_conversations(a.grpc, 940_000)
            row("conversations after the restarts", "same tokens as before", str(after == reference),
                after == reference)
            base = wait_for_pool_baseline(a.metrics, timeout=15)
            row("pool at baseline at the end", "tritonkv_kv_blocks_used 0, live 0",
                f"used {metric_values(a.metrics, 'tritonkv_kv_blocks_used')}", base)
    print("\n| probe | expected | observed | verdict |\n|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(x.replace("|", "/") for x in r) + " |")


if __name__ == "__main__":
    main()
