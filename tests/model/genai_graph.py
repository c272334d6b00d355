"""A decoder in the layout ONNX Runtime's optimizer and its GenAI model builder write: fused ops
instead of primitive patterns. SimplifiedLayerNormalization for the first norm,
SkipSimplifiedLayerNormalization (residual add + RMSNorm) for the others, GroupQueryAttention
(com.microsoft, rotary inside, KV cache in / out) fed by separate or packed QKV projections.
The rotary cos / sin caches are float initializers the loader must not take for weights.
ONNX Runtime runs the graph: an oracle for what it holds."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from optimum_graph import IR_VERSION, _Builder

MS = "com.microsoft"


def build_genai_graph(hf_model, path: str, packed_qkv: bool) -> None:
    cfg = hf_model.config
    sd = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    n_heads, n_kv, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    d = getattr(cfg, "head_dim", None) or hidden // n_heads
    eps = cfg.rms_norm_eps
    b = _Builder()
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])]

    def matmul(x, names, scope):
        w = torch.cat([sd[n + ".weight"] for n in names])
        y = b.op("MatMul", [x, b.weight(scope + ".MatMul.weight", w.t())], scope + "/MatMul")
        biases = [n + ".bias" for n in names if n + ".bias" in sd]
        if biases:
            y = b.op("Add", [y, b.weight(scope + ".Add.bias", torch.cat([sd[n] for n in biases]))], scope + "/Add")
        return y

    def skip_norm(x, residual, weight, scope):
        normed, total = scope + "/output_0", scope + "/output_3"
        b.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, residual, b.weight(weight, sd[weight])],
                                        [normed, "", "", total], name=scope, domain=MS, epsilon=eps))
        return normed, total

    inv_freq = hf_model.model.rotary_emb.inv_freq.float()
    freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
    cos = b.weight("cos_cache", torch.cos(freqs))
    sin = b.weight("sin_cache", torch.sin(freqs))
    seqlens = b.op("Cast", [b.op("Sub", [b.op("ReduceSum", ["attention_mask", b.const([1])], "/model/attn_mask_reformat/ReduceSum",
                                              keepdims=0), b.const(1)], "/model/attn_mask_reformat/Sub")],
                   "/model/attn_mask_reformat/Cast", to=TensorProto.INT32)
    total = b.op("Cast", [b.op("Gather", [b.op("Shape", ["attention_mask"], "/model/attn_mask_reformat/Shape"), b.const(1)],
                               "/model/attn_mask_reformat/Gather", axis=0)], "/model/attn_mask_reformat/Cast_1",
                 to=TensorProto.INT32)
    residual = b.op("Gather", [b.weight("model.embed_tokens.weight", sd["model.embed_tokens.weight"]), "input_ids"],
                    "/model/embed_tokens/Gather")
    h = b.op("SimplifiedLayerNormalization", [residual, b.weight("model.layers.0.input_layernorm.weight",
                                                                 sd["model.layers.0.input_layernorm.weight"])],
             "/model/layers.0/input_layernorm/LayerNorm", axis=-1, epsilon=eps)
    for i in range(cfg.num_hidden_layers):
        p, s = f"model.layers.{i}.", f"/model/layers.{i}"
        names = [p + f"self_attn.{r}_proj" for r in "qkv"]
        if packed_qkv:
            qkv = [matmul(h, names, f"{s}/attn/qkv_proj"), "", ""]
        else:
            qkv = [matmul(h, [n], f"{s}/attn/{n.rsplit('.', 1)[1]}") for n in names]
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present = [f"present.{i}.key", f"present.{i}.value"]
        for name in past:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", n_kv, "past_sequence_length", d]))
        for name in present:
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", n_kv, "total_sequence_length", d]))
        attn = f"{s}/attn/GroupQueryAttention/output_0"
        b.nodes.append(helper.make_node("GroupQueryAttention", qkv + past + [seqlens, total, cos, sin], [attn] + present,
                                        name=f"{s}/attn/GroupQueryAttention", domain=MS, num_heads=n_heads,
                                        kv_num_heads=n_kv, do_rotary=1, rotary_interleaved=0))
        o = matmul(attn, [p + "self_attn.o_proj"], f"{s}/attn/o_proj")
        h, residual = skip_norm(o, residual, p + "post_attention_layernorm.weight", f"{s}/post_attention_layernorm/SkipLayerNorm")
        gate = matmul(h, [p + "mlp.gate_proj"], f"{s}/mlp/gate_proj")
        up = matmul(h, [p + "mlp.up_proj"], f"{s}/mlp/up_proj")
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{s}/mlp/act_fn/Sigmoid")], f"{s}/mlp/act_fn/Mul")
        down = matmul(b.op("Mul", [act, up], f"{s}/mlp/Mul"), [p + "mlp.down_proj"], f"{s}/mlp/down_proj")
        nxt = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < cfg.num_hidden_layers else "model.norm.weight"
        h, residual = skip_norm(down, residual, nxt, f"/model/layers.{i + 1}/input_layernorm/SkipLayerNorm")
    head = "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"
    b.nodes.append(helper.make_node("Identity", [matmul(h, [head], "/lm_head")], ["logits"]))
    graph = helper.make_graph(b.nodes, "main_graph", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=IR_VERSION)
    onnx.save(model, path)


def genai_feeds(cfg, ids: list[int]) -> dict:
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg.num_key_value_heads, 0, d), np.float32)
    return feeds
