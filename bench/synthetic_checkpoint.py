"""Random-weight HF-format checkpoints of real model shapes (no hub, no tokenizer).

``write_synthetic(shape, directory)`` writes config.json + bf16 safetensors shards once
(weights ~ N(0, 0.02), norms 1, seeded); later calls reuse the directory. Shapes: Llama-3-8B
and a Llama-3.2-1B-like model. Such a model's outputs are noise, but its bytes and FLOPs per
token are the real model's, which is what a speed benchmark needs.
"""

from __future__ import annotations

import json
import os

import torch

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                     max_position_embeddings=8192, tie_word_embeddings=True),
    # two small layers with the 8B's vocabulary and context: host-side costs on a CPU
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, tie_word_embeddings=False),
}


def write_synthetic(shape: str, directory: str, seed: int = 0) -> str:
    cfg = dict(SHAPES[shape], architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
               bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16")
    done = os.path.join(directory, "config.json")
    if os.path.exists(done):
        _write_index(directory)
        return directory
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]

    def normal(*shape):
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    shard = {"model.embed_tokens.weight": normal(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not cfg["tie_word_embeddings"]:
        shard["lm_head.weight"] = normal(v, h)
    save_file(shard, os.path.join(directory, "model-embed.safetensors"))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard = {p + "self_attn.q_proj.weight": normal(q, h), p + "self_attn.k_proj.weight": normal(kv, h),
                 p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, q),
                 p + "mlp.gate_proj.weight": normal(inter, h), p + "mlp.up_proj.weight": normal(inter, h),
                 p + "mlp.down_proj.weight": normal(h, inter),
                 p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        save_file(shard, os.path.join(directory, f"model-layer{i:03d}.safetensors"))
    _write_index(directory)
    with open(done + ".tmp", "w") as f:
        json.dump(cfg, f, indent=1)
    os.replace(done + ".tmp", done)
    return directory


def _write_index(directory: str) -> None:
    """model.safetensors.index.json (HF's loader needs it for sharded weights)."""
    from safetensors import safe_open

    path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(path):
        return
    weight_map = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), name))
    with open(path, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def random_llama(path: str, config: dict) -> str:
    """A small Llama with HF's random init (seed 0) and ``config`` (LlamaConfig fields, fp32),
    written to ``path`` once; later calls reuse it."""
    if not os.path.exists(os.path.join(path, "config.json")):
        import transformers

        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).save_pretrained(path)
    return path
