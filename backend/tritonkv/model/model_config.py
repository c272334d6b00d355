"""The architecture facts tritonkv needs, read from an HF ``config.json``.

Supported families: Llama, Mistral, Qwen2 (all "pre-norm RMSNorm + rotary + GQA + SwiGLU").
Rules:
- Qwen2 always has q/k/v biases; Llama has them when ``attention_bias`` is true.
- Rope settings come from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` +
  ``rope_scaling`` (older configs).
- Mistral's ``sliding_window`` is honoured; Qwen2's only when ``use_sliding_window`` is true,
  and then (as HF) only on layers ``>= max_window_layers`` (or those ``layer_types`` names
  ``sliding_attention``): every layer or none is served; a mix is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from tritonkv.model.onnx_files import checkpoint_directory

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


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
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"checkpoint architecture {arch!r} is not supported; tritonkv serves "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope["rope_type"] = rope_type
        if arch == "Qwen2ForCausalLM":
            qkv_bias = True
            window = _qwen2_window(cfg)
        else:
            qkv_bias = bool(cfg.get("attention_bias", False))
            window = cfg.get("sliding_window") if arch == "MistralForCausalLM" else None
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


def _qwen2_window(cfg: dict) -> int | None:
    if not cfg.get("use_sliding_window") or not cfg.get("sliding_window"):
        return None
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["sliding_attention" if i >= cfg.get("max_window_layers", 28)
                                       else "full_attention" for i in range(layers)]
    sliding = sum(t == "sliding_attention" for t in types)
    if sliding == 0:
        return None
    if sliding < layers:
        raise ValueError(f"this Qwen2 checkpoint slides a window on {sliding} of its {layers} layers "
                         "(max_window_layers / layer_types); tritonkv serves a window on every layer or none")
    return cfg["sliding_window"]
