"""ONNX exports of the tiny test models, made in the tests (no hub): torch.onnx (TorchScript
and dynamo paths) of the HF model, optimum-style graphs (optimum_graph.py), and helpers to
rewrite an export (initializer dtype, dropped weight) and to run it in ONNX Runtime."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from tiny_models import build_tiny_checkpoint
from tritonkv.model.onnx_export import export_model

CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def tiny_hf_model(family: str, hf_dir: str, seed: int = 0):
    """The tiny HF model, with random norm weights so that a norm mapped to the wrong layer
    shows (HF initialises them all to one, and exporters then keep one shared copy)."""
    model = build_tiny_checkpoint(family, hf_dir, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def copy_config(src_dir: str, onnx_dir: str) -> str:
    os.makedirs(onnx_dir, exist_ok=True)
    for name in CONFIG_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), onnx_dir)
    return onnx_dir


def export_torchscript(model, hf_dir: str, onnx_dir: str) -> str:
    """The shipped exporter (torch.onnx, TorchScript path); the graph holds its weights."""
    return export_model(model, hf_dir, onnx_dir, dynamo=False)


def export_dynamo(model, hf_dir: str, onnx_dir: str) -> str:
    """The shipped exporter's torch.export path; weights in an external data file."""
    return export_model(model, hf_dir, onnx_dir, dynamo=True)


def rewrite(src_dir: str, dst_dir: str, edit) -> str:
    """A copy of an export with ``edit(model)`` applied, weights written as external data."""
    copy_config(src_dir, dst_dir)
    model = onnx.load(os.path.join(src_dir, "model.onnx"))
    edit(model)
    onnx.save(model, os.path.join(dst_dir, "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    return dst_dir


def recast_initializers(dtype: torch.dtype):
    """An edit turning every float32 initializer into ``dtype`` (float16 / bfloat16)."""
    code = {torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}[dtype]

    def edit(model):
        for t in model.graph.initializer:
            if t.data_type == TensorProto.FLOAT:
                values = torch.from_numpy(numpy_helper.to_array(t).copy()).to(dtype)
                raw = values.view(torch.int16).numpy().tobytes()
                new = onnx.helper.make_tensor(t.name, code, list(t.dims), raw, raw=True)
                t.CopyFrom(new)
    return edit


def drop_initializer(name_of):
    """An edit removing the initializer ``name_of(model)`` picks."""

    def edit(model):
        name = name_of(model)
        keep = [t for t in model.graph.initializer if t.name != name]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return edit


def rounded_hf(model, dtype: torch.dtype):
    """The HF model with its weights rounded through ``dtype`` (computing in fp32)."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(p.to(dtype).float())
    return twin


def ort_logits(onnx_path: str, feeds: dict) -> np.ndarray:
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = onnxruntime.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]


def as_merged_decoder(path: str) -> None:
    """Rewrite ``path`` as optimum's merged decoder: weights stay in the top graph, the
    computation moves into the branches of an ``If`` on a ``use_cache_branch`` input (the
    no-past branch here is the same computation under renamed values)."""
    model = onnx.load(path)
    g = model.graph
    outer = {t.name for t in g.initializer} | {i.name for i in g.input}

    def branch(suffix: str):
        nodes = []
        for node in g.node:
            n = onnx.NodeProto()
            n.CopyFrom(node)
            n.name = node.name + suffix
            n.input[:] = [x if (x in outer or not x) else x + suffix for x in node.input]
            n.output[:] = [x + suffix for x in node.output]
            nodes.append(n)
        for out in g.output:
            nodes.append(onnx.helper.make_node("Identity", [out.name + suffix], [out.name + suffix + "_out"]))
        outs = [onnx.helper.make_tensor_value_info(o.name + suffix + "_out", o.type.tensor_type.elem_type, None)
                for o in g.output]
        return onnx.helper.make_graph(nodes, "branch" + suffix, [], outs)

    cond = onnx.helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    node = onnx.helper.make_node("If", ["use_cache_branch"], [o.name for o in g.output], name="optimum::if",
                                 then_branch=branch("_with_past"), else_branch=branch("_no_past"))
    del g.node[:]
    g.node.append(node)
    g.input.append(cond)
    onnx.save(model, path)
