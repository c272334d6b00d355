"""Which model class serves a checkpoint's architecture, and how its config.json and its
weights read (as vLLM's models/registry.py: architecture name -> class, lazily imported).

Adding an architecture is an entry in ``ARCHITECTURES`` (its class, its attention facts, its
weight names) plus its test; ModelConfig, the loaders, the runner and the engine factory ask
this table and name no architecture themselves.

Rules:
- The key is config.json's ``architectures[0]`` (a config without one is read as Llama).
- ``attention(cfg)``: what config.json says about the architecture's attention, as
  ``(qkv_bias, sliding_window)``. Qwen2 always has q/k/v biases; Llama has them when
  ``attention_bias`` is true. Mistral's ``sliding_window`` is honoured; Qwen2's only when
  ``use_sliding_window`` is true, and then (as HF) only on layers ``>= max_window_layers``
  (or those ``layer_types`` names ``sliding_attention``): every layer or none is served.
- ``weight_name(name)``: the model's parameter for a checkpoint weight name; None for what the
  model recomputes itself (HF's saved ``rotary_emb.inv_freq``). Any other unknown weight is
  an error at load (it would change what the checkpoint computes).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


def hf_weight_name(name: str) -> str | None:
    """The Llama-family classes keep HF's parameter names."""
    return None if name.endswith("rotary_emb.inv_freq") else name


def llama_attention(cfg: dict) -> tuple[bool, int | None]:
    return bool(cfg.get("attention_bias", False)), None


def mistral_attention(cfg: dict) -> tuple[bool, int | None]:
    return bool(cfg.get("attention_bias", False)), cfg.get("sliding_window")


def qwen2_attention(cfg: dict) -> tuple[bool, int | None]:
    if not cfg.get("use_sliding_window") or not cfg.get("sliding_window"):
        return True, None
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["sliding_attention" if i >= cfg.get("max_window_layers", 28)
                                       else "full_attention" for i in range(layers)]
    sliding = sum(t == "sliding_attention" for t in types)
    if sliding == 0:
        return True, None
    if sliding < layers:
        raise ValueError(f"this Qwen2 checkpoint slides a window on {sliding} of its {layers} layers "
                         "(max_window_layers / layer_types); tritonkv serves a window on every layer or none")
    return True, cfg["sliding_window"]


@dataclass(frozen=True)
class Architecture:
    module: str  # where the model class lives (imported when first built)
    class_name: str
    attention: Callable[[dict], tuple[bool, int | None]]
    weight_name: Callable[[str], str | None] = hf_weight_name

    def model_class(self):
        return getattr(importlib.import_module(self.module), self.class_name)


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("tritonkv.model.llama", "CausalLM", llama_attention),
    "MistralForCausalLM": Architecture("tritonkv.model.llama", "CausalLM", mistral_attention),
    "Qwen2ForCausalLM": Architecture("tritonkv.model.llama", "CausalLM", qwen2_attention),
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"checkpoint architecture {name!r} is not supported; tritonkv serves "
                         f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_model(model_config):
    """An uninitialised model of ``model_config`` (a ModelConfig), on the current default device
    (``torch.device("meta")`` to count or load weights)."""
    return architecture(model_config.architecture).model_class()(model_config)
