"""An ONNX decoder's weights under HF parameter names, found from the graph's structure.

Layer order is the data flow's: blocks are ordered by where they sit in a topological order
of the graph (layer i+1 reads what layer i wrote), attention before MLP in every layer.
Rotary tables, masks and shapes are computed or constant tensors, never weights.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from tritonkv.model.model_config import ModelConfig
from tritonkv.model.onnx_blocks import (Block, BlockError, Part, attention_output, attention_role, mlp_roles,
                                        norm_weight, split_parts)
from tritonkv.model.onnx_graph import GraphView, Weight
from tritonkv.model.onnx_linears import Linear, check_not_quantised, find_embedding, find_linears


@dataclass(frozen=True)
class Piece:
    """Where one HF tensor comes from: a weight (transposed or not), or rows of a fused one."""

    weight: Weight
    transpose: bool = False
    rows: tuple[int, int] | None = None

    def describe(self) -> str:
        rows = f" rows {self.rows[0]}..{self.rows[1]}" if self.rows else ""
        return f"{self.weight.describe()}{' transposed' if self.transpose else ''}{rows}"


def decoder_pieces(view: GraphView, cfg: ModelConfig) -> dict[str, Piece]:
    """HF name -> Piece for every weight ``CausalLM(cfg)`` needs (lm_head only when untied)."""
    check_not_quantised(view)
    embed = find_embedding(view, cfg.hidden_size)
    linears = find_linears(view)
    if not linears:
        raise ValueError(f"the ONNX graph has no projections (MatMul / Gemm with initializer weights); "
                         f"found ops {view.op_counts()}")
    attention, mlps = _blocks(view, cfg, linears)
    _check_layers(cfg, attention, mlps)
    used = {p.linear.node for b in attention + mlps for p in b.parts.values()} | {b.out.node for b in attention + mlps}
    heads = [lin for lin in linears if lin.node not in used and lin.out_features == cfg.vocab_size
             and lin.in_features == cfg.hidden_size]
    if not heads:
        raise ValueError(f"the ONNX graph has no LM head: expected a projection [{cfg.hidden_size}->{cfg.vocab_size}] "
                         "after the last layer's norm")
    lm_head = max(heads, key=lambda lin: lin.node)
    h = cfg.hidden_size
    pieces = {"model.embed_tokens.weight": Piece(embed),
              "model.norm.weight": Piece(norm_weight(view, lm_head.input, h, "the final norm"))}
    if not cfg.tie_word_embeddings:
        pieces["lm_head.weight"] = Piece(lm_head.weight, lm_head.transpose)
    for i, (attn, mlp) in enumerate(zip(attention, mlps)):
        p = f"model.layers.{i}."
        pieces[p + "input_layernorm.weight"] = Piece(norm_weight(view, attn.reads, h, f"layer {i}'s input norm"))
        pieces[p + "post_attention_layernorm.weight"] = Piece(
            norm_weight(view, mlp.reads, h, f"layer {i}'s post-attention norm"))
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        _add_parts(pieces, p + "self_attn.", attn, {"q": q, "k": kv, "v": kv}, cfg.qkv_bias, i)
        _add_parts(pieces, p + "mlp.", mlp, {"gate": cfg.intermediate_size, "up": cfg.intermediate_size}, False, i)
        pieces[p + "self_attn.o_proj.weight"] = Piece(attn.out.weight, attn.out.transpose)
        pieces[p + "mlp.down_proj.weight"] = Piece(mlp.out.weight, mlp.out.transpose)
    return pieces


def _blocks(view: GraphView, cfg: ModelConfig, linears: list[Linear]) -> tuple[list[Block], list[Block]]:
    by_node = {lin.node: lin for lin in linears}
    groups: dict[str, list[Linear]] = defaultdict(list)
    for lin in linears:
        groups[lin.input].append(lin)
    attention, mlps = [], []
    for reads, members in groups.items():
        parts = [Part(lin, lin.output) for lin in members] if len(members) > 1 else split_parts(view, members[0])
        roles = [attention_role(view, part, set(by_node)) for part in parts]
        first = min(lin.node for lin in members)
        if any(r is not None and r[0] is not None for r in roles):
            block = Block("attention", reads, first_node=first)
            for part, found in zip(parts, roles):
                if found is None or found[0] is None:
                    continue
                role, junction = found
                if role in block.parts:
                    raise BlockError(f"two projections of one attention block act as {role}: "
                                     f"{part.linear.describe(view)}, {block.parts[role].linear.describe(view)}")
                part.role, block.parts[role] = role, part
                if role == "v" or block.out is None:
                    block.out = attention_output(view, junction, by_node)
            attention.append(block)
        elif len(parts) == 2:
            roles, meet = mlp_roles(view, parts, by_node)
            block = Block("mlp", reads, first_node=first)
            for role, part in roles.items():
                part.role, block.parts[role] = role, part
            block.out = attention_output(view, meet, by_node)
            mlps.append(block)
    attention.sort(key=lambda b: b.first_node)
    mlps.sort(key=lambda b: b.first_node)
    for i, b in enumerate(attention):
        _check_attention(view, cfg, b, i)
    for i, b in enumerate(mlps):
        if b.out is None or (b.out.in_features, b.out.out_features) != (cfg.intermediate_size, cfg.hidden_size):
            found = b.out.describe(view) if b.out else "nothing"
            raise BlockError(f"layer {i}'s MLP: after gate * up comes {found}; expected down_proj "
                             f"[{cfg.intermediate_size}->{cfg.hidden_size}]")
    return attention, mlps


def _check_attention(view: GraphView, cfg: ModelConfig, block: Block, i: int) -> None:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    parts = block.parts
    if set(parts) == {"q"} and parts["q"].linear.out_features == q + 2 * kv:
        # packed QKV into an attention op's first input
        lin = parts["q"].linear
        block.parts = {r: Part(lin, lin.output, k, r) for k, r in enumerate("qkv")}
        return
    missing = [r for r in "qkv" if r not in parts]
    if missing:
        found = {r: p.linear.describe(view) for r, p in parts.items()}
        raise BlockError(f"layer {i}'s attention: found {found}, missing {missing}; expected q, k and v "
                         "projections (MatMul / Gemm with initializer weights, or one fused QKV)")
    if block.out is None or (block.out.in_features, block.out.out_features) != (q, cfg.hidden_size):
        found = block.out.describe(view) if block.out else "nothing"
        raise BlockError(f"layer {i}'s attention: after attention comes {found}; expected o_proj [{q}->{cfg.hidden_size}]")


def _check_layers(cfg: ModelConfig, attention: list[Block], mlps: list[Block]) -> None:
    n = cfg.num_layers
    if len(attention) != n or len(mlps) != n:
        raise ValueError(f"the ONNX graph has {len(attention)} attention blocks and {len(mlps)} MLP blocks; "
                         f"config.json says num_hidden_layers = {n} (a layer's projections may be missing)")
    for i in range(n):
        after = attention[i + 1].first_node if i + 1 < n else float("inf")
        if not attention[i].first_node < mlps[i].first_node < after:
            raise ValueError(f"the ONNX graph's layer {i} does not run attention then MLP in its data flow")


def _add_parts(pieces: dict, prefix: str, block: Block, sizes: dict[str, int], bias: bool, layer: int) -> None:
    offsets, start = {}, 0
    for role, size in sizes.items():
        offsets[role] = (start, start + size)
        start += size
    for role, size in sizes.items():
        part = block.parts[role]
        lin = part.linear
        fused = lin.output != part.value or sum(1 for p in block.parts.values() if p.linear is lin) > 1
        if fused:
            if [p.role for p in sorted(block.parts.values(), key=lambda p: p.index)] != list(sizes):
                raise BlockError(f"layer {layer}: a fused {'/'.join(sizes)} projection splits in another order")
            if lin.out_features != start:
                raise BlockError(f"layer {layer}: fused projection {lin.weight.describe()} has {lin.out_features} "
                                 f"outputs; expected {start} ({sizes})")
            rows = offsets[role]
        else:
            rows = None
            if lin.out_features != size:
                raise BlockError(f"layer {layer}'s {role} projection {lin.weight.describe()} has {lin.out_features} "
                                 f"outputs; config.json gives {size}")
        pieces[f"{prefix}{role}_proj.weight"] = Piece(lin.weight, lin.transpose, rows)
        if bias and lin.bias is None:
            raise BlockError(f"layer {layer}'s {role} projection has no bias; config.json's architecture has q/k/v biases")
        if not bias and lin.bias is not None:
            raise BlockError(f"layer {layer}'s {role} projection has a bias {lin.bias.describe()}; "
                             "config.json's architecture has none (set attention_bias)")
        if bias:
            pieces[f"{prefix}{role}_proj.bias"] = Piece(lin.bias, False, rows)


def load_pieces(pieces: dict[str, Piece], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read every piece once, in ``dtype``; a fused weight is read once and split into views,
    a weight that several names share (exporters deduplicate equal tensors) is copied per name."""
    loaded: dict[tuple[str, bool], torch.Tensor] = {}
    state, taken = {}, set()
    for name, piece in pieces.items():
        key = (piece.weight.name, piece.transpose)
        if key not in loaded:
            loaded[key] = piece.weight.load(dtype, piece.transpose)
        tensor = loaded[key]
        if piece.rows is not None:
            tensor = tensor[piece.rows[0]:piece.rows[1]]
        elif key in taken:
            tensor = tensor.clone()
        taken.add(key)
        state[name] = tensor
    return state
