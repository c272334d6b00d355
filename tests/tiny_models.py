"""Tiny HF checkpoints built locally (seeded) for the oracle tests: no hub access."""

from __future__ import annotations

import os

import torch

FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"]),
    "llama_gqa": dict(architectures=["LlamaForCausalLM"], num_key_value_heads=1),
    "mistral_window": dict(architectures=["MistralForCausalLM"], sliding_window=8),
    "qwen2_bias": dict(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True),
}

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, initializer_range=0.25, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)


def build_tiny_checkpoint(family: str, path: str, seed: int = 0):
    """Writes an HF checkpoint directory; returns the HF model (fp32, eval) for the oracle."""
    import transformers

    spec = {**BASE, **FAMILIES[family]}
    arch = spec["architectures"][0]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**spec)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).float().eval()
    if family == "qwen2_bias":  # HF initialises biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return model


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Full recompute of the whole context at every step: the oracle for every cached path."""
    ids = list(prompt_ids)
    out, logits = [], []
    for _ in range(max_new_tokens):
        step_logits = model(torch.tensor([ids])).logits[0, -1].float()
        token = int(step_logits.argmax())
        logits.append(step_logits)
        out.append(token)
        ids.append(token)
    return out, logits
