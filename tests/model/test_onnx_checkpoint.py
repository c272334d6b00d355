"""ONNX exports of the tiny models load into the engine: greedy tokens equal HF transformers on
the original weights, and ONNX Runtime running the same graph gives the engine's logits."""

import os
import random

import pytest
import torch

from engine_helpers import TEST_DEVICE, engine_prefill_logits, make_engine, run_turn
from onnx_exports import (as_merged_decoder, copy_config, export_dynamo, export_torchscript, ort_logits,
                          recast_initializers, rewrite, rounded_hf, tiny_hf_model)
from genai_graph import build_genai_graph, genai_feeds
from optimum_graph import build_optimum_graph, optimum_feeds
from tiny_models import hf_greedy
from tritonkv.model.checkpoint import load_model
from tritonkv.model.onnx_files import weight_files

TOL = dict(atol=2e-4, rtol=1e-4) if TEST_DEVICE == "cpu" else dict(atol=2e-2, rtol=2e-2)


def prompt(n, seed):
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 96) for _ in range(n - 1)]


def plain_feeds(ids):
    """ONNX Runtime inputs of a logits-only export (onnx_export.py): ids and an all-ones mask."""
    return {"input_ids": torch.tensor([ids]).numpy(), "attention_mask": torch.ones(1, len(ids), dtype=torch.int64).numpy()}


def assert_two_turns_match_hf(onnx_dir, hf):
    """A two-turn conversation (the second turn reuses the first's KV) equals HF's recompute."""
    engine = make_engine(onnx_dir)
    first, second = prompt(13, 1), prompt(6, 2)[1:]
    t1 = run_turn(engine, "c", first, 12, start=True, end=False)
    assert t1.token_ids == hf_greedy(hf, first, 12)[0]
    t2 = run_turn(engine, "c", second, 10, start=False, end=True)
    assert t2.token_ids == hf_greedy(hf, first + t1.token_ids + second, 10)[0]
    assert engine.pool.counts()["used"] == 0
    return engine


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: (str(root / f), tiny_hf_model(f, str(root / f))) for f in ("llama", "llama_gqa", "mistral_window",
                                                                          "qwen2_bias")}


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "mistral_window", "qwen2_bias"])
def test_torchscript_export_matches_hf_and_onnxruntime(models, family, tmp_path):
    hf_dir, hf = models[family]
    onnx_dir = export_torchscript(hf, hf_dir, str(tmp_path / "onnx"))
    engine = assert_two_turns_match_hf(onnx_dir, hf)
    ids = prompt(11, 3)
    ort = ort_logits(os.path.join(onnx_dir, "model.onnx"), plain_feeds(ids))
    torch.testing.assert_close(engine_prefill_logits(engine, ids), torch.from_numpy(ort[0]), **TOL)


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_bias"])
def test_dynamo_export_with_external_data_matches_hf_and_onnxruntime(models, family, tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    hf_dir, hf = models[family]
    onnx_dir = export_dynamo(hf, hf_dir, str(tmp_path / "onnx"))
    assert weight_files(onnx_dir) == [os.path.join(onnx_dir, "model.onnx"), os.path.join(onnx_dir, "model.onnx.data")]
    engine = assert_two_turns_match_hf(onnx_dir, hf)
    ids = prompt(9, 4)
    ort = ort_logits(os.path.join(onnx_dir, "model.onnx"), plain_feeds(ids))
    torch.testing.assert_close(engine_prefill_logits(engine, ids), torch.from_numpy(ort[0]), **TOL)


@pytest.mark.parametrize("family,with_past,variant", [
    ("llama_gqa", False, "matmul"), ("llama_gqa", True, "matmul"), ("qwen2_bias", True, "gemm"),
    ("llama", True, "fused"), ("qwen2_bias", False, "fused"), ("llama_gqa", True, "simplified_norm")])
def test_optimum_style_graph_matches_hf_and_onnxruntime(models, family, with_past, variant, tmp_path):
    hf_dir, hf = models[family]
    onnx_dir = copy_config(hf_dir, str(tmp_path / "onnx"))
    build_optimum_graph(hf, os.path.join(onnx_dir, "model.onnx"), with_past, variant)
    engine = assert_two_turns_match_hf(onnx_dir, hf)
    ids = prompt(10, 5)
    ort = ort_logits(os.path.join(onnx_dir, "model.onnx"), optimum_feeds(hf.config, ids, with_past))
    torch.testing.assert_close(engine_prefill_logits(engine, ids), torch.from_numpy(ort[0]), **TOL)


@pytest.mark.parametrize("family,packed_qkv", [("llama_gqa", False), ("qwen2_bias", True)])
def test_onnxruntime_fused_ops_graph_matches_hf_and_onnxruntime(models, family, packed_qkv, tmp_path):
    """SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization and GroupQueryAttention
    (rotary inside, cos / sin caches as initializers), separate or packed QKV."""
    hf_dir, hf = models[family]
    onnx_dir = copy_config(hf_dir, str(tmp_path / "onnx"))
    build_genai_graph(hf, os.path.join(onnx_dir, "model.onnx"), packed_qkv)
    engine = assert_two_turns_match_hf(onnx_dir, hf)
    ids = prompt(12, 6)
    ort = ort_logits(os.path.join(onnx_dir, "model.onnx"), genai_feeds(hf.config, ids))
    torch.testing.assert_close(engine_prefill_logits(engine, ids), torch.from_numpy(ort[0]), **TOL)


def test_optimum_merged_decoder_reads_the_if_branch(models, tmp_path):
    hf_dir, hf = models["llama_gqa"]
    onnx_dir = copy_config(hf_dir, str(tmp_path / "merged"))
    path = os.path.join(onnx_dir, "decoder_model_merged.onnx")
    build_optimum_graph(hf, path, with_past=True)
    as_merged_decoder(path)
    assert_two_turns_match_hf(onnx_dir, hf)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_initializers_load_exactly(models, dtype, tmp_path):
    hf_dir, hf = models["llama_gqa"]
    fp32_dir = export_torchscript(hf, hf_dir, str(tmp_path / "fp32"))
    onnx_dir = rewrite(fp32_dir, str(tmp_path / "half"), recast_initializers(dtype))
    twin = rounded_hf(hf, dtype)
    model = load_model(onnx_dir, torch.device("cpu"), dtype)
    assert model.model.layers[1].mlp.down_proj.weight.dtype == dtype
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight,
                               hf.model.layers[1].mlp.down_proj.weight.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(model.model.layers[0].post_attention_layernorm.weight,
                               hf.model.layers[0].post_attention_layernorm.weight.to(dtype), atol=0, rtol=0)
    assert_two_turns_match_hf(onnx_dir, twin)  # fp32 compute on the rounded weights


def test_the_onnx_file_itself_names_the_checkpoint(models, tmp_path):
    hf_dir, hf = models["llama"]
    onnx_dir = export_torchscript(hf, hf_dir, str(tmp_path / "onnx"))
    model = load_model(os.path.join(onnx_dir, "model.onnx"), torch.device("cpu"), torch.float32)
    for name, p in hf.named_parameters():
        if "norm" in name or "down_proj" in name or "o_proj" in name or "embed" in name or "lm_head" in name:
            assert torch.equal(dict(model.named_parameters())[name], p), name
    q, k, v = (getattr(hf.model.layers[1].self_attn, f"{r}_proj").weight for r in "qkv")
    assert torch.equal(model.model.layers[1].self_attn.qkv_proj.weight, torch.cat([q, k, v]))
    # the engine too: config.json (and a tokenizer, if any) are read beside the file
    ids = prompt(7, 3)
    engine = make_engine(os.path.join(onnx_dir, "model.onnx"))
    assert run_turn(engine, "file", ids, 6, start=True, end=True).token_ids == hf_greedy(hf, ids, 6)[0]


def test_weights_inside_the_graph_stay_in_the_file_until_loaded(models, tmp_path):
    import onnx
    from onnx import numpy_helper

    from tritonkv.model.onnx_wire import load_without_weights

    hf_dir, hf = models["llama"]
    path = os.path.join(export_torchscript(hf, hf_dir, str(tmp_path / "onnx")), "model.onnx")
    parsed, ranges = load_without_weights(path)
    full = onnx.load(path)
    assert [t.name for t in parsed.graph.initializer] == [t.name for t in full.graph.initializer]
    assert not any(t.HasField("raw_data") for t in parsed.graph.initializer)
    assert parsed.ByteSize() < os.path.getsize(path) / 4  # the graph without its weights
    with open(path, "rb") as f:
        data = f.read()
    for t in full.graph.initializer:
        offset, length = ranges[t.name]
        assert data[offset:offset + length] == t.raw_data
    first = full.graph.initializer[0]
    assert parsed.graph.initializer[0].dims == first.dims and numpy_helper.to_array(first).size > 1000
