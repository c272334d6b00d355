"""Load a checkpoint into its architecture's model (model/registry.py): an HF directory (config.json + *.safetensors), or an
ONNX export (a directory with config.json and an .onnx graph, or the .onnx file itself; see
model/onnx_files.py for which graph is read)."""

from __future__ import annotations

import glob
import os

import torch
from safetensors.torch import load_file

from tritonkv.cache.allocate import model_dtype
from tritonkv.model.model_config import ModelConfig
from tritonkv.model.registry import architecture, build_model
from tritonkv.model.onnx_files import checkpoint_directory, is_onnx_checkpoint, onnx_graph_path

def resolve_dtype(requested: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype the model runs in on ``device`` (cache/allocate.py's rule)."""
    return model_dtype(requested, cfg.torch_dtype, device.type)


def safetensors_state(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(checkpoint_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir!r} has no *.safetensors weight files (nor an .onnx graph)")
    state = {}
    for path in files:
        state.update(load_file(path))
    return state


def onnx_state(checkpoint: str, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The graph's weights under HF names, in ``dtype``; every weight's bytes are checked to
    exist before any is read, so a broken export fails fast."""
    from tritonkv.model.onnx_graph import load_graph
    from tritonkv.model.onnx_weights import decoder_pieces, load_pieces

    path = onnx_graph_path(checkpoint)
    try:
        view = load_graph(path)
        pieces = decoder_pieces(view, cfg)
        for piece in pieces.values():
            piece.weight.byte_range()
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"ONNX checkpoint {path!r} is not a supported Llama-family decoder: {e}") from None
    return load_pieces(pieces, dtype)


def load_model(checkpoint: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    cfg = ModelConfig.from_checkpoint(checkpoint_directory(checkpoint))
    with torch.device("meta"):
        model = build_model(cfg)
    state = onnx_state(checkpoint, cfg, dtype) if is_onnx_checkpoint(checkpoint) else safetensors_state(checkpoint)
    weight_name = architecture(cfg.architecture).weight_name
    state = {name: w for name, w in ((weight_name(k), v) for k, v in state.items()) if name is not None}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    params = model.state_dict()
    expected = {k for k in params if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - state.keys())
    if missing:
        raise ValueError(f"checkpoint {checkpoint!r} lacks weights: {missing[:5]}")
    # a weight the model has no place for changes what the checkpoint computes: never drop it
    unused = sorted(state.keys() - expected)
    if unused:
        raise ValueError(f"checkpoint {checkpoint!r} has weights this model does not use: {unused[:5]} "
                         "(an o_proj bias or MLP biases, as HF Llama's attention_bias / mlp_bias add, "
                         "are not supported)")
    wrong = [f"{k} {list(state[k].shape)} (config.json gives {list(params[k].shape)})"
             for k in sorted(expected) if state[k].shape != params[k].shape]
    if wrong:
        raise ValueError(f"checkpoint {checkpoint!r} has weights of the wrong shape: {wrong[:5]}")
    state = {k: v.to(dtype) for k, v in state.items() if k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    del state  # fusing frees each unfused weight as it goes only if nothing else holds it
    model.finish_loading()
    return model.to(device).eval()
