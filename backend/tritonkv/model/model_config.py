"""The architecture facts tritonkv needs, read from an HF ``config.json``.

The architectures served, and what each reads of config.json for its attention (q/k/v
biases, sliding window), are model/registry.py's.
Rules:
- Rope settings come from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` +
  ``rope_scaling`` (older configs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from tritonkv.model.onnx_files import checkpoint_directory
from tritonkv.model.registry import architecture


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    qkv_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        qkv_bias, window = architecture(arch).attention(cfg)
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope["rope_type"] = rope_type
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_theta=float(rope_theta),
            rope_scaling=rope,
            qkv_bias=qkv_bias,
            sliding_window=window,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str) -> "ModelConfig":
        checkpoint_dir = checkpoint_directory(checkpoint_dir)  # an .onnx file: config.json beside it
        path = os.path.join(checkpoint_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint_dir!r} has no config.json; point 'checkpoint' at an HF-format "
                "model directory (config.json + *.safetensors)"
            )
        with open(path) as f:
            cfg = json.load(f)
        gen_path = os.path.join(checkpoint_dir, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                gen = json.load(f)
            if gen.get("eos_token_id") is not None:
                cfg = {**cfg, "eos_token_id": gen["eos_token_id"]}
        return cls.from_dict(cfg)

