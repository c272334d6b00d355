"""A dense, pool-free implementation of the streaming / h2o policies (plain torch over the HF
model's weights), written from the policy's definition, not from the engine's code.

Definition (cache/eviction/streaming.py and h2o.py state the same): tokens are grouped in blocks of
``block_size``; sink blocks = the first ``ceil(attention_sinks / block_size)``; before the
query at text position ``p`` is computed, the recent window starts at block
``max(sinks, floor(floor((p - kv_window + 1) / block_size) / G) * G)``, where the stride
``G = max(1, ceil(kv_window_stride / block_size))`` blocks. Streaming keeps sinks + window.
h2o also keeps up to ``ceil(heavy_hitter_tokens / block_size)`` blocks between them: when
there are more, the ones with the least accumulated attention mass go (ties: the older).
The query attends to every kept token and itself; positions are ranks inside the kept
cache (the query's own is the largest). Mass: for each query that samples a token, the
softmax probability it gives to each key, summed over heads and layers, added to the key's
block. Keys and values are stored before rotary embedding and rotated at their current rank.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine_helpers import TEST_DEVICE


# logits closer than this are a tie on CUDA (another summation order; the bound dates from tf32
# dots, now full fp32: kernels/jit_helpers.mma); CPU runs are exact
NEAR_TIE = 2e-2


class DensePolicyReference:
    def __init__(self, hf_model, mode: str, block_size: int, kv_window: int, attention_sinks: int,
                 heavy_hitter_tokens: int = 0, kv_window_stride: int = 0):
        self.hf = hf_model
        cfg = hf_model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.mode, self.bs, self.window = mode, block_size, kv_window
        self.sink_blocks = -(-attention_sinks // block_size)
        self.heavy_blocks = -(-heavy_hitter_tokens // block_size) if mode == "h2o" else 0
        self.stride = max(1, -(-kv_window_stride // block_size))
        layers = len(hf_model.model.layers)
        self.keys = [{} for _ in range(layers)]  # text position -> [kv_heads, head_dim], before rotary
        self.values = [{} for _ in range(layers)]
        self.kept: list[int] = []  # kept block numbers, ascending
        self.mass: dict[int, float] = {}
        self.length = 0  # tokens computed
        self.most_kept_blocks = 0

    def _evict_before(self, p: int) -> None:
        start = max(self.sink_blocks, (p - self.window + 1) // self.bs // self.stride * self.stride)
        between = [b for b in self.kept if self.sink_blocks <= b < start]
        if self.mode == "streaming":
            gone = set(between)
        else:
            excess = len(between) - self.heavy_blocks
            gone = set(sorted(between, key=lambda b: (self.mass.get(b, 0.0), b))[:max(excess, 0)])
        self.kept = [b for b in self.kept if b not in gone]

    def _rope(self, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """``x`` [n, heads, head_dim] rotated at ``positions``, as HF's attention does."""
        pos = torch.tensor([positions])
        cos, sin = self.hf.model.rotary_emb(x, pos)
        rotated, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos, sin)
        return rotated[0].transpose(0, 1)

    @torch.no_grad()
    def feed(self, token: int, sample: bool) -> torch.Tensor | None:
        """Compute one token; its logits if ``sample`` (and then its mass counts)."""
        p = self.length
        self._evict_before(p)
        if p // self.bs not in self.kept:
            self.kept.append(p // self.bs)
        self.most_kept_blocks = max(self.most_kept_blocks, len(self.kept))
        kept_set = set(self.kept)
        context = [q for q in range(p) if q // self.bs in kept_set] + [p]
        group = self.heads // self.kv_heads
        x = self.hf.model.embed_tokens(torch.tensor([token]))
        block_mass: dict[int, float] = {}
        for i, layer in enumerate(self.hf.model.layers):
            h = layer.input_layernorm(x)
            att = layer.self_attn
            q = att.q_proj(h).view(1, self.heads, self.head_dim)
            self.keys[i][p] = att.k_proj(h).view(self.kv_heads, self.head_dim)
            self.values[i][p] = att.v_proj(h).view(self.kv_heads, self.head_dim)
            k = torch.stack([self.keys[i][c] for c in context])
            v = torch.stack([self.values[i][c] for c in context])
            ranks = list(range(len(context)))
            q = self._rope(q, ranks[-1:])
            k = self._rope(k, ranks)
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,khd->hk", q[0], k) * self.head_dim ** -0.5
            probs = torch.softmax(scores, dim=-1)
            out = torch.einsum("hk,khd->hd", probs, v).reshape(1, -1)
            x = x + att.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if sample:
                for c, m in zip(context, probs.sum(0).tolist()):
                    block_mass[c // self.bs] = block_mass.get(c // self.bs, 0.0) + m
        self.length += 1
        if not sample:
            return None
        for b, m in block_mass.items():
            self.mass[b] = self.mass.get(b, 0.0) + m
        return self.hf.lm_head(self.hf.model.norm(x))[0].float()


def reference_turn(ref: DensePolicyReference, new_tokens: list[int], max_tokens: int,
                   pending: list[int], follow: list[int] | None = None) -> list[int]:
    """One greedy turn. ``pending``: the previous turn's last token, sampled but not yet
    computed (the engine computes it with the next turn's tokens); updated in place.

    ``follow`` (the engine's tokens) matters on CUDA only, where the summation order differs from
    the CPU's: the reference then feeds the engine's tokens and accepts each one whose logit is
    within NEAR_TIE of its own best (a near-tie, not a policy difference); the first token
    that is not is replaced by the reference's choice, so an equality assert shows where."""
    feed = pending + new_tokens
    for t in feed[:-1]:
        ref.feed(t, False)
    logits = ref.feed(feed[-1], True)
    out = []
    for i in range(max_tokens):
        best = int(logits.argmax())
        token = best
        if follow is not None and TEST_DEVICE != "cpu" and i < len(follow):
            if logits[follow[i]] >= logits[best] - NEAR_TIE:
                token = follow[i]
        out.append(token)
        if token != best and follow is not None and token != follow[i]:
            break
        if i < max_tokens - 1:
            logits = ref.feed(out[-1], True)
    pending[:] = out[-1:]
    return out
