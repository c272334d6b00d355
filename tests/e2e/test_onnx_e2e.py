"""A real tritonserver serving an ONNX export of the demo model: a multi-turn conversation
and a text request give HF transformers' greedy tokens on the original weights."""

import os

import pytest

from tiny_models import hf_greedy
from triton_calls import StreamClient, http_generate
from tritonkv.model import onnx_export
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
from tritonkv.server.launcher import start_server

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    onnx_dir = str(tmp_path_factory.mktemp("demo_onnx"))
    assert onnx_export.main([ensure_demo_checkpoint(), onnx_dir]) == 0  # the documented export command
    assert sorted(os.listdir(onnx_dir)) == ["config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    with start_server(onnx_dir, extra_params={"max_model_len": "512", "kv_cache_memory_mb": "64"}) as s:
        yield s


def test_multi_turn_conversation_matches_hf(server, hf_demo):
    client = StreamClient(server.grpc_url)
    try:
        history = []
        turns = [[256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [32, 65, 103, 97, 105, 110], [63, 33]]
        for i, new in enumerate(turns):
            t = client.turn(seq_id=1616, start=i == 0, end=i == 2, ids=new, max_tokens=8, **GREEDY)
            assert t.error is None
            assert t.ids == hf_greedy(hf_demo, history + new, 8)[0], f"turn {i + 1}"
            assert t.finish_reason == "length"
            assert t.cached_tokens == (0 if i == 0 else len(history) - 1)
            history += new + t.ids
    finally:
        client.close()


def test_text_request_uses_the_exports_tokenizer(server, hf_demo):
    code, body = http_generate(server.http_url, "llm_stateless", {"text_input": "Hello", "max_tokens": 6, **GREEDY})
    assert code == 200, body
    assert body["output_ids"] == hf_greedy(hf_demo, [256] + list(b"Hello"), 6)[0]
    assert body["prompt_tokens"] == 6  # BOS + 5 byte tokens: the byte-level tokenizer.json beside the graph
