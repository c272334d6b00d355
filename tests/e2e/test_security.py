"""Issue 13 item 3 against a real server started by the launcher: a client cannot register
shared memory (the SIGSEGV and the pool read-back both started there), change logging or
tracing, or load / unload models; the launcher's key can; inference is untouched; the
files behind the server are private to its user; the key is never shown."""

import os
import stat

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from triton_calls import StreamClient, http_generate
from tritonkv.core.runtime_dir import core_paths
from tritonkv.server.launcher import ADMIN_HEADER, REGION_DIR, server_regions, start_server

POOL = f"sectest{os.getpid()}"


@pytest.fixture(scope="module")
def server():
    with start_server(extra_params={"pool_name": POOL, "kv_cache_memory_mb": "32"}) as s:
        yield s


def refused(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    message = str(info.value)
    assert "restricted" in message and ADMIN_HEADER in message, message
    return message


def test_system_shared_memory_cannot_be_registered(server):
    # the two item-3 attacks: a region with an offset as an output (SIGSEGV in the stub) and
    # a pool file as an input region (read back through errors); both need registration
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    refused(lambda: h.register_system_shared_memory("pool", f"/tritonkv-{POOL}-cpu0.pool", 64))
    refused(lambda: h.register_system_shared_memory("out", f"/tritonkv-{POOL}-cpu0.kv", 64, offset=8))
    refused(lambda: g.register_system_shared_memory("pool", f"/tritonkv-{POOL}-cpu0.pool", 64))
    refused(lambda: h.get_system_shared_memory_status())
    refused(lambda: g.get_system_shared_memory_status())
    refused(lambda: h.register_cuda_shared_memory("c", b"\0" * 64, 0, 64))
    refused(lambda: g.unregister_system_shared_memory())
    # an inference that names a region is refused too (nothing is registered)
    ids = grpcclient.InferInput("input_ids", [2], "INT32")
    ids.set_shared_memory("pool", 8)
    with pytest.raises(InferenceServerException):
        g.infer("llm_stateless", [ids])
    assert server.process.poll() is None and server.is_ready()


def test_logging_and_trace_settings_cannot_be_changed(server):
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    refused(lambda: h.update_log_settings({"log_verbose_level": 1}))
    refused(lambda: g.update_log_settings({"log_verbose_level": 1}))
    refused(lambda: h.get_log_settings())
    refused(lambda: h.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}))
    refused(lambda: g.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}))
    # the launcher's key opens them (gRPC: "triton-grpc-protocol-" + the header name)
    assert server.admin_request("GET", "/v2/logging")["log_verbose_level"] == 0
    assert g.get_log_settings(headers=server.grpc_admin_headers, as_json=True)["settings"]["log_info"]
    wrong = {ADMIN_HEADER: "0" * len(server.admin_key)}
    refused(lambda: h.get_log_settings(headers=wrong))


def test_model_control_is_the_launchers_alone(server):
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    refused(lambda: h.unload_model("llm"))
    refused(lambda: g.unload_model("llm_stateless"))
    refused(lambda: h.load_model("llm"))
    refused(lambda: g.get_model_repository_index())
    index = server.admin_request("POST", "/v2/repository/index", {})
    assert {m["name"]: m["state"] for m in index} == {"llm": "READY", "llm_stateless": "READY"}
    names = g.get_model_repository_index(headers=server.grpc_admin_headers, as_json=True)["models"]
    assert sorted(m["name"] for m in names) == ["llm", "llm_stateless"]


def test_inference_and_health_still_work(server):
    code, body = http_generate(server.http_url, "llm_stateless", {"text_input": "Hi", "max_tokens": 3})
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
    assert grpcclient.InferenceServerClient(server.grpc_url).is_model_ready("llm_stateless")


def test_files_behind_the_server_are_private(server):
    core = core_paths(f"{POOL}-cpu0")  # the engine core's socket and lock, in a 0700 directory
    assert stat.S_IMODE(os.stat(os.path.dirname(core.socket)).st_mode) == 0o700
    regions = server_regions(server.region_token)
    assert len(regions) >= 3, regions  # a region per stub (llm, llm_stateless) and the lock
    for path in [core.socket, core.lock] + [os.path.join(REGION_DIR, r) for r in regions]:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
        assert st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(server.workdir).st_mode) == 0o700


def test_the_key_is_never_shown(server):
    assert len(server.admin_key) >= 32
    assert server.admin_key not in repr(server)
    assert server.admin_key not in server.log()
