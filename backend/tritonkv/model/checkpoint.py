"""Load an HF-format checkpoint directory (config.json + *.safetensors) into ``CausalLM``."""

from __future__ import annotations

import glob
import os

import torch
from safetensors.torch import load_file

from tritonkv.model.llama import CausalLM
from tritonkv.model.model_config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto' means float32 on CPU (exact oracle) and the checkpoint's dtype on GPU."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    return DTYPES.get(cfg.torch_dtype.replace("torch.", ""), torch.bfloat16)


def load_model(checkpoint_dir: str, device: torch.device, dtype: torch.dtype) -> CausalLM:
    cfg = ModelConfig.from_checkpoint(checkpoint_dir)
    files = sorted(glob.glob(os.path.join(checkpoint_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir!r} has no *.safetensors weight files")
    with torch.device("meta"):
        model = CausalLM(cfg)
    state = {}
    for path in files:
        state.update(load_file(path))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - state.keys())
    if missing:
        raise ValueError(f"checkpoint {checkpoint_dir!r} lacks weights: {missing[:5]}")
    state = {k: v.to(dtype) for k, v in state.items() if k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    model.fuse_projections()
    return model.to(device).eval()
