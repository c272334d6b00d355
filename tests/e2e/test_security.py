"""Against the shared server (default settings): a client cannot register shared memory (the
SIGSEGV and the memory read-back both started there), change logging or tracing, or load /
unload models, and neither can a local user who reads the key from tritonserver's command
line; inference is untouched; the Python backend's regions live in a /dev/shm of the
server's own, never in the host's; the key is never shown."""

import http.client
import os
import socket
import stat

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from triton_calls import StreamClient, http_generate
from tritonkv.server.launcher import ADMIN_HEADER, GRPC_ADMIN_HEADER, RESTRICTED_APIS, tritonserver_command
from tritonkv.server.shm_regions import REGION_DIR, region_prefix


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server


def refused(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    message = str(info.value)
    assert "restricted" in message and ADMIN_HEADER in message, message
    return message


def key_on_the_command_line(server) -> str:
    """What any local user reads in /proc/<tritonserver>/cmdline."""
    with open(f"/proc/{server.process.pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    flag = next(a for a in argv if a.startswith("--http-restricted-api="))
    return flag.split(f"{ADMIN_HEADER}=", 1)[1]


def test_shared_memory_cannot_be_registered(server):
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    region = f"/{server.regions()[0]}"
    refused(lambda: h.register_system_shared_memory("r", region, 64))
    refused(lambda: h.register_system_shared_memory("out", region, 64, offset=8))
    refused(lambda: g.register_system_shared_memory("r", region, 64))
    refused(lambda: h.get_system_shared_memory_status())
    refused(lambda: g.get_system_shared_memory_status())
    refused(lambda: h.register_cuda_shared_memory("c", b"\0" * 64, 0, 64))
    refused(lambda: g.unregister_system_shared_memory())
    ids = grpcclient.InferInput("input_ids", [2], "INT32")  # an inference naming a region: refused too
    ids.set_shared_memory("r", 8)
    with pytest.raises(InferenceServerException):
        g.infer(server.stateless_model, [ids])
    assert server.process.poll() is None and server.is_ready()


def test_logging_trace_and_model_control_are_closed_to_everyone(server):
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    refused(lambda: h.update_log_settings({"log_verbose_level": 1}))
    refused(lambda: g.update_log_settings({"log_verbose_level": 1}))
    refused(lambda: h.get_log_settings())
    refused(lambda: h.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}))
    refused(lambda: g.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}))
    refused(lambda: h.unload_model("llm"))
    refused(lambda: g.unload_model(server.stateless_model))
    refused(lambda: h.load_model("llm"))
    refused(lambda: g.get_model_repository_index())
    assert server.admin_key is None
    with pytest.raises(PermissionError):
        server.admin_request("GET", "/v2/logging")


def test_the_key_read_from_proc_opens_nothing(server):
    """tritonserver 2.51 takes the key only on its command line; a newline in it means no HTTP
    header and no gRPC metadata can carry it."""
    key = key_on_the_command_line(server)
    assert "\n" in key and len(key) > 32
    with pytest.raises(ValueError):  # http.client refuses to send it
        conn = http.client.HTTPConnection(server.host, server.http_port, timeout=10)
        conn.request("GET", "/v2/logging", headers={ADMIN_HEADER: key})
    for raw in (key.encode(), key.replace("\n", "\r\n ").encode(), key.replace("\n", "").encode()):
        with socket.create_connection((server.host, server.http_port), timeout=10) as s:
            s.sendall(b"GET /v2/logging HTTP/1.1\r\nHost: x\r\n" + ADMIN_HEADER.encode() + b": " + raw + b"\r\n\r\n")
            status = s.recv(200).split(b"\r\n", 1)[0]
        assert not status.startswith(b"HTTP/1.1 200"), (raw, status)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    for value in (key, key.strip()):
        with pytest.raises(InferenceServerException):
            g.get_log_settings(headers={GRPC_ADMIN_HEADER: value})
    assert server.process.poll() is None and server.is_ready()


def test_admin_key_mode_puts_a_usable_key_on_the_command_line_and_in_a_private_file(tmp_path):
    """--admin-key: a sendable key (documented as readable through /proc)."""
    cmd = tritonserver_command(str(tmp_path), str(tmp_path), "127.0.0.1",
                               {"--http-port": 1, "--grpc-port": 2, "--metrics-port": 3}, 1.5, "0" * 16,
                               RESTRICTED_APIS, "k" * 64)
    apis = ",".join(RESTRICTED_APIS)
    assert f"--http-restricted-api={apis}:{ADMIN_HEADER}={'k' * 64}" in cmd
    assert f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={'k' * 64}" in cmd


def test_inference_and_health_still_work(server):
    code, body = http_generate(server.http_url, server.stateless_model, {"text_input": "Hi", "max_tokens": 3})
    assert code == 200 and body["finish_reason"] == "length", body
    client = StreamClient(server.grpc_url)
    try:
        t1 = client.turn(seq_id=4242, start=True, ids=[256, 65], max_tokens=2, temperature=0.0)
        t2 = client.turn(seq_id=4242, end=True, ids=[66], max_tokens=2, temperature=0.0)
    finally:
        client.close()
    assert t1.error is None and len(t1.ids) == 2 and t2.error is None and len(t2.ids) == 2
    h = httpclient.InferenceServerClient(server.http_url)
    assert h.is_server_live() and h.is_server_ready() and h.is_model_ready("llm")
    assert h.get_model_metadata("llm")["name"] == "llm"
    assert grpcclient.InferenceServerClient(server.grpc_url).is_model_ready(server.stateless_model)


def test_python_backend_regions_are_born_in_a_dev_shm_of_the_servers_own():
    """The backend makes its regions 0644 whatever the umask (boost fchmod); so they must never
    be in the host's /dev/shm: tritonserver and every stub see a private tmpfs (mode 0700),
    a different file system from the host's /dev/shm, and nothing of this server is there
    but its lock file (0600)."""
    import shared_server
    from tritonkv.server.private_shm import command_prefix

    if command_prefix() is None:
        pytest.skip("this system allows no mount namespace (no CAP_SYS_ADMIN, no user namespaces): the regions "
                    "fall back to the host's /dev/shm, chmod 0600 once ready (docs/security.md)")
    server = shared_server.shared_server()
    assert server.private_shm
    own = os.stat(server.shm_dir)
    assert stat.S_IMODE(own.st_mode) == 0o700 and own.st_uid == os.geteuid()
    assert own.st_dev != os.stat(REGION_DIR).st_dev
    regions = server.regions()
    assert len(regions) >= 2, regions  # a region per stub (llm, llm_stateless)
    from tritonkv.server.supervisor import find_stubs

    stubs = find_stubs(server)
    assert len(stubs) >= 2
    for pid in stubs:  # the stubs see the same private /dev/shm
        assert os.stat(f"/proc/{pid}/root/dev/shm").st_dev == own.st_dev
    on_host = [n for n in os.listdir(REGION_DIR) if n.startswith(region_prefix(server.region_token)[:-1])]
    assert on_host == [os.path.basename(region_prefix(server.region_token)[:-1]) + ".lock"], on_host
    lock = os.stat(os.path.join(REGION_DIR, on_host[0]))
    assert stat.S_IMODE(lock.st_mode) == 0o600 and lock.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(server.workdir).st_mode) == 0o700


def test_the_key_is_never_shown(server):
    key = key_on_the_command_line(server)
    assert key not in repr(server) and key.strip() not in server.log()
