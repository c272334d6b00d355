"""A graph that is not a supported decoder fails model load with what was found and expected."""

import json
import os
import re

import onnx
import pytest
import torch

from onnx_exports import copy_config, drop_initializer, export_torchscript, rewrite, tiny_hf_model
from optimum_graph import build_optimum_graph
from tritonkv.model.checkpoint import load_model
from tritonkv.model.onnx_files import onnx_graph_path

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_errors")
    hf = tiny_hf_model("llama", str(root / "hf"))
    return str(root / "hf"), hf, export_torchscript(hf, str(root / "hf"), str(root / "ts"))


def load_error(checkpoint, kind=ValueError) -> str:
    with pytest.raises(kind) as info:
        load_model(checkpoint, CPU, torch.float32)
    return str(info.value)


def test_truncated_graph_file(llama, tmp_path):
    _, _, ts = llama
    broken = copy_config(ts, str(tmp_path / "cut"))
    with open(os.path.join(ts, "model.onnx"), "rb") as f:
        data = f.read()
    with open(os.path.join(broken, "model.onnx"), "wb") as f:
        f.write(data[: len(data) // 2])
    message = load_error(broken)
    assert "is not a readable ONNX model" in message and "truncated" in message
    assert os.path.join(broken, "model.onnx") in message


def test_truncated_external_data(llama, tmp_path):
    _, _, ts = llama
    external = rewrite(ts, str(tmp_path / "ext"), lambda model: None)
    data = os.path.join(external, "model.onnx.data")
    size = os.path.getsize(data)
    os.truncate(data, size - 1000)
    message = load_error(external)
    assert re.search(rf"needs bytes \d+\.\.{size} of 'model.onnx.data', but the file has {size - 1000} bytes "
                     r"\(truncated\?\)", message), message
    os.remove(data)
    assert "which is missing beside the graph" in load_error(external, FileNotFoundError)


def test_graph_missing_one_layers_weight(llama, tmp_path):
    _, _, ts = llama

    def k_proj_of_layer_1(model):
        node = next(n for n in model.graph.node if n.op_type == "MatMul" and "layers.1/self_attn/k_proj" in n.name)
        return node.input[1]

    broken = rewrite(ts, str(tmp_path / "no_k"), drop_initializer(k_proj_of_layer_1))
    message = load_error(broken)
    assert "layer 1's attention" in message and "missing ['k']" in message, message
    assert "'q'" in message and "'v'" in message and "[64->32]" in message


def test_graph_missing_one_norm_weight(llama, tmp_path):
    _, _, ts = llama
    broken = rewrite(ts, str(tmp_path / "no_norm"),
                     drop_initializer(lambda m: next(t.name for t in m.graph.initializer
                                                     if "layers.0.post_attention_layernorm" in t.name)))
    message = load_error(broken)
    assert "layer 0's post-attention norm" in message and "expected an RMSNorm" in message, message


def test_non_decoder_graph(tmp_path, llama):
    hf_dir, _, _ = llama
    path = copy_config(hf_dir, str(tmp_path / "mlp"))
    classifier = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    torch.onnx.export(classifier, (torch.zeros(1, 64),), os.path.join(path, "model.onnx"), dynamo=False)
    message = load_error(path)
    assert "no token embedding" in message and "Gather from a [vocab, 64] initializer" in message
    assert "'Gemm': 2" in message and "'Relu': 1" in message, message


def test_unknown_activation(llama, tmp_path):
    hf_dir, hf, _ = llama
    path = copy_config(hf_dir, str(tmp_path / "gelu"))
    build_optimum_graph(hf, os.path.join(path, "model.onnx"), with_past=False)
    model = onnx.load(os.path.join(path, "model.onnx"))
    for node in model.graph.node:
        if node.op_type == "Sigmoid":
            node.op_type = "Tanh"
    onnx.save(model, os.path.join(path, "model.onnx"))
    message = load_error(path)
    assert "unknown MLP activation: found ['Mul', 'Tanh']" in message and "expected SiLU" in message, message


def test_quantised_graph(llama, tmp_path):
    _, _, ts = llama

    def quantise_one(model):
        node = next(n for n in model.graph.node if n.op_type == "MatMul" and "layers.0/mlp/up_proj" in n.name)
        node.op_type, node.domain = "MatMulNBits", "com.microsoft"

    message = load_error(rewrite(ts, str(tmp_path / "q4"), quantise_one))
    assert "the ONNX graph is quantised (found {'MatMulNBits': 1})" in message, message


def test_layer_count_disagrees_with_config(llama, tmp_path):
    _, _, ts = llama
    path = rewrite(ts, str(tmp_path / "three"), lambda model: None)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, "num_hidden_layers": 3}, f)
    message = load_error(path)
    assert "2 attention blocks and 2 MLP blocks; config.json says num_hidden_layers = 3" in message, message


def test_which_graph_a_directory_serves(llama, tmp_path):
    _, _, ts = llama
    path = copy_config(ts, str(tmp_path / "two"))
    for name in ("a.onnx", "b.onnx"):
        with open(os.path.join(ts, "model.onnx"), "rb") as src, open(os.path.join(path, name), "wb") as dst:
            dst.write(src.read())
    with pytest.raises(ValueError, match=r"has 2 ONNX graphs \['a.onnx', 'b.onnx'\]"):
        onnx_graph_path(path)
    os.rename(os.path.join(path, "b.onnx"), os.path.join(path, "decoder_model_merged.onnx"))
    assert onnx_graph_path(path) == os.path.join(path, "decoder_model_merged.onnx")
