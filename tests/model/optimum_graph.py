"""A Llama-family decoder written with onnx.helper in the layout of optimum's decoder exports.

Names and structure as optimum writes them (TorchScript underneath): inputs ``input_ids``,
``attention_mask``, ``position_ids`` and, with past, ``past_key_values.{i}.key / .value``;
outputs ``logits`` and ``present.{i}.key / .value``; norm weights under HF names, projection
weights as ``onnx::MatMul_<n>`` initializers holding W^T, nodes named
``/model/layers.{i}/self_attn/q_proj/MatMul``. Variants exercise other structures the loader
must read: ``gemm`` (Gemm, transB = 1, W as stored by HF, bias as C), ``fused`` (one QKV and
one gate-up projection, each Split into its parts as Phi-3 exports do) and ``simplified_norm``
(ONNX Runtime's SimplifiedLayerNormalization op in place of the RMSNorm pattern).
ONNX Runtime runs the graph, so it is an oracle of its own for the weights it holds.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

# The graphs' IR version: 10 (onnx 1.16), what every onnxruntime since 1.18 loads. make_model's
# default follows the onnx wheel (11 from onnx 1.18), which an older onnxruntime beside it refuses
# to load (the GPU image's did: "Fail" at InferenceSession).
IR_VERSION = 10


class _Builder:
    """Nodes and initializers; with ``data_file`` the weights go to it as external data, one at
    a time in their own dtype (float32 / float16 / bfloat16), as big exports are written."""

    def __init__(self, data_file=None, location: str = ""):
        self.nodes, self.inits, self.count = [], [], 0
        self.data_file, self.location, self.offset = data_file, location, 0

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        tensor = tensor.contiguous()
        if self.data_file is None:
            self.inits.append(numpy_helper.from_array(tensor.float().numpy(), name))
            return name
        raw = (tensor.view(torch.int16) if tensor.dtype in (torch.float16, torch.bfloat16) else tensor).numpy().tobytes()
        t = TensorProto(name=name, data_type=DATA_TYPES[tensor.dtype], dims=list(tensor.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(len(raw)))):
            t.external_data.add(key=key, value=value)
        self.data_file.write(raw)
        self.offset += len(raw)
        pad = -self.offset % 4096  # page-aligned weights, as onnx's own writer does
        self.data_file.write(b"\0" * pad)
        self.offset += pad
        self.inits.append(t)
        return name

    def matmul_weight(self, tensor: torch.Tensor) -> str:
        self.count += 1
        return self.weight(f"onnx::MatMul_{1000 + self.count}", tensor)

    def const(self, array, dtype=np.int64) -> str:
        self.count += 1
        name = f"/Constant_{self.count}_output_0"
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array, dtype))))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out


DATA_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}


def build_optimum_graph(hf_model, path: str, with_past: bool, variant: str = "matmul") -> None:
    """Writes ``path`` (.onnx, weights inside) from an fp32 HF Llama / Mistral / Qwen2 model."""
    state = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    write_decoder_graph(hf_model.config, state, hf_model.model.rotary_emb.inv_freq.float(), path, with_past, variant)


def write_decoder_graph(cfg, sd, inv_freq: torch.Tensor, path: str, with_past: bool, variant: str = "matmul",
                        external_data: str | None = None) -> None:
    """``sd[hf_name]`` -> torch tensor (a mapping that may read lazily); ``external_data``: a file
    name beside ``path`` receiving the weights (the graph then holds none)."""
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    eps = cfg.rms_norm_eps
    data_file = open(os.path.join(os.path.dirname(path), external_data), "wb") if external_data else None
    b = _Builder(data_file, external_data or "")

    def norm(x, weight_name, scope):
        if variant == "simplified_norm":  # ONNX Runtime's fused RMSNorm op, as its optimizer writes
            return b.op("SimplifiedLayerNormalization", [x, b.weight(weight_name, sd[weight_name])],
                        f"{scope}/SimplifiedLayerNormalization", axis=-1, epsilon=eps)
        sq = b.op("Pow", [x, b.const(2.0, np.float32)], f"{scope}/Pow")
        mean = b.op("ReduceMean", [sq], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
        std = b.op("Sqrt", [b.op("Add", [mean, b.const(eps, np.float32)], f"{scope}/Add")], f"{scope}/Sqrt")
        inv = b.op("Div", [b.const(1.0, np.float32), std], f"{scope}/Div")
        return b.op("Mul", [b.weight(weight_name, sd[weight_name]), b.op("Mul", [x, inv], f"{scope}/Mul")],
                    f"{scope}/Mul_1")

    def linear(x, hf_names: list[str], scope):
        w = torch.cat([sd[n + ".weight"] for n in hf_names])
        bias = [n + ".bias" for n in hf_names if n + ".bias" in sd]
        name = scope.strip("/").replace("/", ".")  # model.layers.0.self_attn.q_proj, lm_head
        if variant == "gemm":
            flat = b.op("Reshape", [x, b.const([-1, w.shape[1]])], f"{scope}/Reshape")
            inputs = [flat, b.weight(name + ".weight", w)]
            if bias:
                inputs.append(b.weight(name + ".bias", torch.cat([sd[n] for n in bias])))
            y = b.op("Gemm", inputs, f"{scope}/Gemm", transB=1)
            lead = b.op("Slice", [b.op("Shape", [x], f"{scope}/Shape"), b.const([0]), b.const([2])], f"{scope}/Slice")
            shape = b.op("Concat", [lead, b.const([w.shape[0]])], f"{scope}/Concat", axis=0)
            return b.op("Reshape", [y, shape], f"{scope}/Reshape_1")
        y = b.op("MatMul", [x, b.matmul_weight(w.t())], f"{scope}/MatMul")
        if bias:
            y = b.op("Add", [b.weight(name + ".bias", torch.cat([sd[n] for n in bias])), y], f"{scope}/Add")
        return y

    def heads(x, n, scope):  # [B, S, n*d] -> [B, n, S, d]
        return b.op("Transpose", [b.op("Reshape", [x, b.const([0, 0, n, d])], f"{scope}/Reshape")],
                    f"{scope}/Transpose", perm=[0, 2, 1, 3])

    def rotary(x, cos, sin, scope):
        x1 = b.op("Slice", [x, b.const([0]), b.const([d // 2]), b.const([-1])], f"{scope}/Slice")
        x2 = b.op("Slice", [x, b.const([d // 2]), b.const([d]), b.const([-1])], f"{scope}/Slice_1")
        rot = b.op("Concat", [b.op("Neg", [x2], f"{scope}/Neg"), x1], f"{scope}/Concat", axis=-1)
        return b.op("Add", [b.op("Mul", [x, cos], f"{scope}/Mul"), b.op("Mul", [rot, sin], f"{scope}/Mul_1")],
                    f"{scope}/Add")

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])]
    x = b.op("Gather", [b.weight("model.embed_tokens.weight", sd["model.embed_tokens.weight"]), "input_ids"],
             "/model/embed_tokens/Gather")
    # rotary tables from position_ids (computed, not weights)
    inv_freq = inv_freq.float().numpy()
    pos = b.op("Unsqueeze", [b.op("Cast", ["position_ids"], "/model/rotary_emb/Cast", to=TensorProto.FLOAT),
                             b.const([-1])], "/model/rotary_emb/Unsqueeze")
    freqs = b.op("Mul", [pos, b.const(inv_freq, np.float32)], "/model/rotary_emb/Mul")
    emb = b.op("Concat", [freqs, freqs], "/model/rotary_emb/Concat", axis=-1)
    cos = b.op("Unsqueeze", [b.op("Cos", [emb], "/model/rotary_emb/Cos"), b.const([1])], "/model/Unsqueeze_cos")
    sin = b.op("Unsqueeze", [b.op("Sin", [emb], "/model/rotary_emb/Sin"), b.const([1])], "/model/Unsqueeze_sin")
    # causal + padding mask [B, 1, S, T]: key t visible to query s when t <= past + s and mask[t]
    seq = b.op("Gather", [b.op("Shape", ["input_ids"], "/model/Shape"), b.const(1)], "/model/Gather_seq", axis=0)
    total = b.op("Gather", [b.op("Shape", ["attention_mask"], "/model/Shape_1"), b.const(1)], "/model/Gather_total", axis=0)
    past = b.op("Sub", [total, seq], "/model/Sub_past")
    keys = b.op("Range", [b.const(0), total, b.const(1)], "/model/Range")
    queries = b.op("Unsqueeze", [b.op("Range", [past, total, b.const(1)], "/model/Range_1"), b.const([1])],
                   "/model/Unsqueeze_q")
    causal = b.op("LessOrEqual", [keys, queries], "/model/LessOrEqual")
    padding = b.op("Unsqueeze", [b.op("Cast", ["attention_mask"], "/model/Cast_mask", to=TensorProto.BOOL),
                                 b.const([1, 2])], "/model/Unsqueeze_mask")
    visible = b.op("And", [causal, padding], "/model/And")
    mask = b.op("Where", [visible, b.const(0.0, np.float32), b.const(-1e9, np.float32)], "/model/Where")
    for i in range(cfg.num_hidden_layers):
        p, s = f"model.layers.{i}.", f"/model/layers.{i}"
        h = norm(x, p + "input_layernorm.weight", f"{s}/input_layernorm")
        qkv = [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"]
        if variant == "fused":
            fused = linear(h, qkv, f"{s}/self_attn/qkv_proj")
            parts = [f"{s}/self_attn/Split_output_{k}" for k in range(3)]
            b.nodes.append(helper.make_node("Split", [fused, b.const([n_heads * d, n_kv * d, n_kv * d])], parts,
                                            name=f"{s}/self_attn/Split", axis=-1))
        else:
            parts = [linear(h, [name], f"{s}/self_attn/{name.rsplit('.', 1)[1]}") for name in qkv]
        q = rotary(heads(parts[0], n_heads, f"{s}/self_attn/q"), cos, sin, f"{s}/self_attn/rotary_q")
        k = rotary(heads(parts[1], n_kv, f"{s}/self_attn/k"), cos, sin, f"{s}/self_attn/rotary_k")
        v = heads(parts[2], n_kv, f"{s}/self_attn/v")
        if with_past:
            for kind, t in (("key", k), ("value", v)):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                            ["batch_size", n_kv, "past_sequence_length", d]))
            k = b.op("Concat", [f"past_key_values.{i}.key", k], f"{s}/self_attn/Concat_k", axis=2)
            v = b.op("Concat", [f"past_key_values.{i}.value", v], f"{s}/self_attn/Concat_v", axis=2)
            for kind, t in (("key", k), ("value", v)):
                b.nodes.append(helper.make_node("Identity", [t], [f"present.{i}.{kind}"]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                             ["batch_size", n_kv, "total_sequence_length", d]))
        if n_kv != n_heads:  # repeat_kv
            rep = b.const([1, 1, n_heads // n_kv, 1, 1])
            k, v = (b.op("Reshape", [b.op("Tile", [b.op("Unsqueeze", [t, b.const([2])], f"{s}/self_attn/Unsqueeze_{c}"),
                                                   rep], f"{s}/self_attn/Tile_{c}"), b.const([0, n_heads, -1, d])],
                         f"{s}/self_attn/Reshape_{c}") for t, c in ((k, "k"), (v, "v")))
        kt = b.op("Transpose", [k], f"{s}/self_attn/Transpose_k", perm=[0, 1, 3, 2])
        scores = b.op("Mul", [b.op("MatMul", [q, kt], f"{s}/self_attn/MatMul"), b.const(d ** -0.5, np.float32)],
                      f"{s}/self_attn/Mul_scale")
        probs = b.op("Softmax", [b.op("Add", [scores, mask], f"{s}/self_attn/Add_mask")], f"{s}/self_attn/Softmax", axis=-1)
        ctx = b.op("Transpose", [b.op("MatMul", [probs, v], f"{s}/self_attn/MatMul_1")], f"{s}/self_attn/Transpose_1",
                   perm=[0, 2, 1, 3])
        ctx = b.op("Reshape", [ctx, b.const([0, 0, n_heads * d])], f"{s}/self_attn/Reshape_ctx")
        x = b.op("Add", [x, linear(ctx, [p + "self_attn.o_proj"], f"{s}/self_attn/o_proj")], f"{s}/Add")
        h = norm(x, p + "post_attention_layernorm.weight", f"{s}/post_attention_layernorm")
        if variant == "fused":
            fused = linear(h, [p + "mlp.gate_proj", p + "mlp.up_proj"], f"{s}/mlp/gate_up_proj")
            gate, up = f"{s}/mlp/Split_output_0", f"{s}/mlp/Split_output_1"
            b.nodes.append(helper.make_node("Split", [fused, b.const([cfg.intermediate_size] * 2)], [gate, up],
                                            name=f"{s}/mlp/Split", axis=-1))
        else:
            gate = linear(h, [p + "mlp.gate_proj"], f"{s}/mlp/gate_proj")
            up = linear(h, [p + "mlp.up_proj"], f"{s}/mlp/up_proj")
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{s}/mlp/act_fn/Sigmoid")], f"{s}/mlp/act_fn/Mul")
        down = linear(b.op("Mul", [act, up], f"{s}/mlp/Mul"), [p + "mlp.down_proj"], f"{s}/mlp/down_proj")
        x = b.op("Add", [x, down], f"{s}/Add_1")
    x = norm(x, "model.norm.weight", "/model/norm")
    # a tied head is exported as its own (transposed) copy of the embedding, as TorchScript does
    head = "lm_head" if not cfg.tie_word_embeddings else "model.embed_tokens"
    logits = linear(x, [head], "/lm_head")
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    if data_file is not None:
        data_file.close()
    graph = helper.make_graph(b.nodes, "main_graph", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch", ir_version=IR_VERSION)
    onnx.save(model, path)


def optimum_feeds(cfg, ids: list[int], with_past: bool) -> dict:
    """ONNX Runtime inputs for one prompt, no past (past tensors of length 0)."""
    n = len(ids)
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None]}
    if with_past:
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for i in range(cfg.num_hidden_layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg.num_key_value_heads, 0, d), np.float32)
    return feeds
