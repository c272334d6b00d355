"""The weight-carrying ops of an ONNX graph: projections (MatMul / Gemm with an initializer
operand), embeddings (Gather from an initializer) and the values they read.

Orientation rule: HF stores a projection as ``[out, in]``. ``MatMul(x, B)`` with an initializer
``B`` holds ``[in, out]`` (HF's weight transposed); ``Gemm`` holds ``[out, in]`` when
``transB = 1``; a ``Transpose`` between the initializer and the op flips either.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from tritonkv.model.onnx_graph import GraphView, Weight, type_name

ALIAS_OPS = ("Identity", "Cast")  # ops that leave a value's meaning alone
REVIEW_OPS = ALIAS_OPS + ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # ... or only re-view its shape
QUANTISED_OPS = ("MatMulNBits", "MatMulInteger", "QLinearMatMul", "DequantizeLinear", "QuantizeLinear",
                 "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention",
                 "GatherBlockQuantized", "MatMulBnb4", "MatMulFpQ4", "QOrderedMatMul")


@dataclass
class Linear:
    node: int  # the MatMul / Gemm
    weight: Weight
    transpose: bool  # True: the initializer is [in, out]; HF's weight is its transpose
    input: str  # the activation it reads (aliases resolved)
    output: str  # its result, after the bias Add when there is one
    bias: Weight | None = None

    @property
    def out_features(self) -> int:
        return self.weight.dims[0 if not self.transpose else 1]

    @property
    def in_features(self) -> int:
        return self.weight.dims[1 if not self.transpose else 0]

    def describe(self, view: GraphView) -> str:
        node = view.nodes[self.node]
        name = node.name or node.output[0]
        return f"{node.op_type} {name!r} on {self.weight.name!r} [{self.in_features}->{self.out_features}]"


def source(view: GraphView, value: str) -> str:
    """The value behind ``value`` once casts and re-shapes (a Gemm's 2-D view of [batch, seq,
    hidden]) are looked through: projections reading one ``source`` read the same data."""
    while value in view.producer:
        node = view.nodes[view.producer[value]]
        if node.op_type not in REVIEW_OPS:
            break
        value = node.input[0]
    return value


def weight_of(view: GraphView, value: str) -> tuple[Weight, bool] | None:
    """(weight, transposed) when ``value`` is an initializer, possibly via alias ops and one
    2-D Transpose; None when it is computed from the graph's inputs."""
    transposed = False
    while value not in view.weights:
        if value not in view.producer:
            return None
        node = view.nodes[view.producer[value]]
        if node.op_type == "Transpose" and _perm(node) in (None, [1, 0]):
            transposed = not transposed
        elif node.op_type not in ALIAS_OPS:
            return None
        value = node.input[0]
    return view.weights[value], transposed


def _perm(node) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def check_not_quantised(view: GraphView) -> None:
    counts = view.op_counts()
    found = {op: n for op, n in counts.items() if op in QUANTISED_OPS}
    if found:
        raise ValueError(f"the ONNX graph is quantised (found {found}); tritonkv reads float32 / float16 / "
                         "bfloat16 weights: export the model without quantisation")


def _float_weight(found: tuple[Weight, bool] | None, ndim: int, role: str) -> tuple[Weight, bool] | None:
    if found is None or len(found[0].dims) != ndim:
        return None
    if not found[0].is_float:
        raise ValueError(f"{role} {found[0].describe()} is {type_name(found[0].data_type)}; tritonkv reads "
                         "float32 / float16 / bfloat16 weights (a quantised export is not supported)")
    return found


def find_linears(view: GraphView) -> list[Linear]:
    linears = []
    for i, node in enumerate(view.nodes):
        if node.op_type == "MatMul":
            found = _float_weight(weight_of(view, node.input[1]), 2, "projection weight")
            if found is None:
                continue
            weight, flipped = found
            linear = Linear(i, weight, not flipped, source(view, node.input[0]), node.output[0])
        elif node.op_type == "Gemm":
            found = _float_weight(weight_of(view, node.input[1]), 2, "projection weight")
            if found is None:
                continue
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                raise ValueError(f"Gemm {node.name!r} has transA / alpha / beta; expected a plain x @ W^T + b")
            weight, flipped = found
            linear = Linear(i, weight, bool(_attr(node, "transB", 0)) == flipped,
                            source(view, node.input[0]), node.output[0])
            if len(node.input) > 2 and node.input[2]:
                bias = _float_weight(weight_of(view, node.input[2]), 1, "projection bias")
                linear.bias = bias[0] if bias else None
        else:
            continue
        _attach_bias(view, linear)
        linears.append(linear)
    return linears


def _attach_bias(view: GraphView, linear: Linear) -> None:
    users = view.consumers.get(linear.output, [])
    if linear.bias is not None or len(users) != 1 or view.nodes[users[0][0]].op_type != "Add":
        return
    add = view.nodes[users[0][0]]
    other = add.input[1 - users[0][1]]
    bias = _float_weight(weight_of(view, other), 1, "projection bias")
    if bias is not None and bias[0].dims[0] == linear.out_features:
        linear.bias, linear.output = bias[0], add.output[0]


def find_embedding(view: GraphView, hidden_size: int) -> Weight:
    """The token embedding: a Gather whose data is a ``[vocab, hidden]`` initializer and whose
    indices come from the graph's inputs."""
    candidates = []
    for node in view.nodes:
        if node.op_type != "Gather":
            continue
        found = weight_of(view, node.input[0])
        if found and len(found[0].dims) == 2 and not found[1] and weight_of(view, node.input[1]) is None:
            candidates.append(_float_weight(found, 2, "embedding")[0])
    matching = [w for w in candidates if w.dims[1] == hidden_size]
    if not matching:
        raise ValueError(f"the ONNX graph has no token embedding: expected a Gather from a [vocab, {hidden_size}] "
                         f"initializer indexed by input_ids; found {[w.describe() for w in candidates] or 'none'} "
                         f"(ops: {view.op_counts()})")
    return matching[0]
