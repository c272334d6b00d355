"""Llama-family decoder (Llama / Mistral / Qwen2) over a flattened token batch and a paged cache.

Parameter names equal HF's, so a checkpoint's state dict loads as is. The model sees one
``AttentionBatch`` per step: every token of every scheduled sequence, flattened.
"""

from __future__ import annotations

import torch
from torch import nn

from tritonkv.model.model_config import ModelConfig
from tritonkv.model.rope import RotaryEmbedding
from tritonkv.ops import dispatch, fused_ops
from tritonkv.ops.attention_batch import AttentionBatch
from tritonkv.ops.fused_ops import rotary_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """With ``residual``: ``residual += x`` in place, then the norm of the sum."""
        return fused_ops.rms_norm(x, self.weight, self.eps, residual)


def _fuse_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the parts' outputs side by side (one GEMM instead of many)."""
    weight = torch.cat([p.weight.data for p in parts], dim=0)
    has_bias = parts[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.data for p in parts]), requires_grad=False)
    return fused


class Attention(nn.Module):
    """HF parameter names (q_proj / k_proj / v_proj) for loading; ``fuse`` concatenates them
    into ``qkv_proj`` once the weights are in, and ``forward`` needs it (``load_model`` does)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj: nn.Linear | None = None

    def fuse(self) -> None:
        self.qkv_proj = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos_sin, batch: AttentionBatch, layer_cache):
        """``layer_cache``: ``(k_cache, v_cache)``, or ``(k_cache, v_cache, k_scale, v_scale)``
        for an fp8 / int8 cache (scales per token-head, see ops/dispatch.py)."""
        n = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        fused_ops.rotary_qk_(qkv, batch.positions, cos_sin, h, kvh, d)
        q = qkv[:, : h * d].view(n, h, d)
        k = qkv[:, h * d: (h + kvh) * d].view(n, kvh, d)
        v = qkv[:, (h + kvh) * d:].view(n, kvh, d)
        dispatch.write_layer_kv(layer_cache, k, v, batch)
        out = dispatch.attend(q, layer_cache, batch, self.scale)
        return self.o_proj(out.reshape(n, h * d))


class MLP(nn.Module):
    """HF parameter names for loading; ``forward`` needs ``fuse`` (gate and up in one GEMM)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None

    def fuse(self) -> None:
        self.gate_up_proj = _fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x):
        return self.down_proj(fused_ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos_sin, batch, layer_cache):
        """``residual`` holds the stream before this layer's input norm; ``x`` is what the
        previous layer adds to it (None for the first layer). Returns the pair for the next."""
        if residual is None:
            residual = x.clone()
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        x = self.self_attn(h, cos_sin, batch, layer_cache)
        h = self.post_attention_layernorm(x, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """``forward`` returns hidden states of every token; ``logits`` projects the ones sampled."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.cos_sin: torch.Tensor | None = None

    def finish_loading(self) -> None:
        """Once the checkpoint's weights are in (built on the meta device): tie the head to the
        embeddings where config.json says so, build the rotary buffers, fuse the projections."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.model.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.fuse_projections()

    def fuse_projections(self) -> None:
        """Concatenate q/k/v and gate/up weights (call once the checkpoint is loaded)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def rotary_table(self, device) -> torch.Tensor:
        """The ``[max_positions, head_dim]`` float32 cos|sin table, built once per device."""
        if self.cos_sin is None or self.cos_sin.device != torch.device(device):
            rope = self.model.rotary_emb
            self.cos_sin = rotary_cos_sin(rope.inv_freq.cpu(), self.config.max_position_embeddings,
                                          rope.attention_scaling).to(device)
        return self.cos_sin

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, kv_caches) -> torch.Tensor:
        """``kv_caches[layer]`` is that layer's cache tuple (see ``Attention.forward``)."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rotary_table(x.device)
        residual = None
        for layer, layer_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, cos_sin, batch, layer_cache)
        if residual is None:
            return self.model.norm(x)
        return self.model.norm(x, residual)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
