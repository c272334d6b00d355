"""Recognise a decoder layer's parts in an ONNX graph by their data flow, not their names.

Rules (the Llama-family block, as every exporter lays it out):
- An attention block: projections reading one normed value whose results meet at attention:
  the score ``MatMul(q, k^T)`` that leads to ``Softmax`` (q is its input 0, k its input 1),
  the ``MatMul(probs, v)`` whose other input comes from ``Softmax`` (v), or an attention op
  (``Attention`` / ``GroupQueryAttention`` / ``MultiHeadAttention``: inputs 0, 1, 2 are q, k, v).
  o_proj is the first projection after that.
- An MLP block: projections reading one normed value, meeting at a ``Mul``; the one that passes
  an activation on its way there is gate, the other up; the activation must be SiLU
  (``x * Sigmoid(x)`` or ``Swish``). down_proj is the first projection after the ``Mul``.
- Fused QKV / gate-up: one projection whose result is split (``Split`` or ``Slice``) into the
  parts in HF's order (q, k, v / gate, up).
- A norm: ``Mul`` by a ``[hidden]`` weight of ``x * 1/sqrt(mean(x^2) + eps)`` (RMSNorm),
  or a ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` /
  ``RMSNormalization`` op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tritonkv.model.onnx_graph import GraphView, Weight
from tritonkv.model.onnx_linears import ALIAS_OPS, REVIEW_OPS, Linear, weight_of

ATTENTION_OPS = ("Attention", "GroupQueryAttention", "MultiHeadAttention")
NORM_OPS = {"SimplifiedLayerNormalization": 1, "RMSNormalization": 1, "SkipSimplifiedLayerNormalization": 2}
SHAPE_OPS = ALIAS_OPS + ("Reshape", "Slice", "Gather", "Squeeze", "Unsqueeze", "Flatten")
SEARCH_DEPTH = 24  # nodes between a projection and where its result meets the others (rotary, repeat_kv, ...)


@dataclass
class Part:
    """One of q / k / v / gate / up: a projection, or rows of a fused one."""

    linear: Linear
    value: str  # where this part's result starts flowing
    index: int = 0  # position among the fused projection's parts
    role: str = ""


@dataclass
class Block:
    kind: str  # "attention" | "mlp"
    reads: str  # the normed value the projections read
    parts: dict[str, Part] = field(default_factory=dict)
    out: Linear | None = None  # o_proj / down_proj
    first_node: int = 0


class BlockError(ValueError):
    pass


def split_parts(view: GraphView, linear: Linear) -> list[Part]:
    """A projection's result as parts: itself, or the outputs of the Split / Slices it feeds."""
    users = [view.nodes[i] for i, _ in view.consumers.get(linear.output, [])]
    if len(users) == 1 and users[0].op_type == "Split" and len(users[0].output) > 1:
        return [Part(linear, out, k) for k, out in enumerate(users[0].output)]
    if len(users) > 1 and all(u.op_type == "Slice" for u in users):
        starts = [_first_int(view, u.input[1]) for u in users]
        if None not in starts:
            order = sorted(range(len(users)), key=lambda k: starts[k])
            return [Part(linear, users[k].output[0], rank) for rank, k in enumerate(order)]
    return [Part(linear, linear.output)]


def _first_int(view: GraphView, value: str) -> int | None:
    found = weight_of(view, value)
    if found is None:
        return None
    return int(found[0].values().reshape(-1)[0])


def _is_junction(view: GraphView, i: int) -> bool:
    """Where attention's operands meet: an attention op, or a MatMul of two computed values."""
    node = view.nodes[i]
    if node.op_type in ATTENTION_OPS:
        return True
    return node.op_type == "MatMul" and all(x in view.producer and weight_of(view, x) is None for x in node.input)


def _starts(view: GraphView, value: str) -> list[int]:
    return sorted({i for i, _ in view.consumers.get(value, [])})


def _reach_from_value(view: GraphView, value: str, linear_nodes: set[int], stop) -> dict[int, int]:
    """Searches stop at projections, with or without their weight (a broken graph's MatMul on a
    missing initializer is no junction, and nothing behind it belongs to this block)."""
    def boundary(i):
        return i in linear_nodes or stop(i) or (view.nodes[i].op_type in ("MatMul", "Gemm") and not _is_junction(view, i))
    return view.reach(_starts(view, value), True, SEARCH_DEPTH, stop=boundary) if _starts(view, value) else {}


def _arriving_input(view: GraphView, node: int, value: str, reached: dict[int, int]) -> int:
    """Which input of ``node`` carries data derived from ``value``."""
    for k, x in enumerate(view.nodes[node].input):
        if x == value or (x in view.producer and view.producer[x] in reached and view.producer[x] != node):
            return k
    return -1


def _leads_to_softmax(view: GraphView, node: int) -> bool:
    ahead = view.reach([node], True, 8, stop=lambda i: view.nodes[i].op_type == "MatMul")
    return any(view.nodes[i].op_type == "Softmax" for i in ahead)


def attention_role(view: GraphView, part: Part, linear_nodes: set[int]) -> tuple[str, int] | None:
    """('q' | 'k' | 'v', junction node) when the part's result meets attention, else None."""
    reached = _reach_from_value(view, part.value, linear_nodes, lambda i: _is_junction(view, i))
    junctions = sorted((d, i) for i, d in reached.items() if _is_junction(view, i))
    if not junctions:
        return None
    node = junctions[0][1]
    k = _arriving_input(view, node, part.value, reached)
    if view.nodes[node].op_type in ATTENTION_OPS:
        return ("q", "k", "v")[k] if 0 <= k < 3 else None, node
    if _leads_to_softmax(view, node):
        return ("q", "k")[k] if k in (0, 1) else None, node
    return ("v" if k == 1 else None), node


def attention_output(view: GraphView, junction: int, linears: dict[int, Linear]) -> Linear | None:
    """The first projection after the attention junction: o_proj."""
    ahead = view.reach([junction], True, SEARCH_DEPTH, stop=lambda i: i in linears)
    hits = sorted((d, i) for i, d in ahead.items() if i in linears)
    return linears[hits[0][1]] if hits else None


def mlp_roles(view: GraphView, parts: list[Part], linears: dict[int, Linear]) -> tuple[dict[str, Part], int]:
    """{'gate', 'up'} and the Mul where they meet; raises BlockError on another activation."""
    reaches = [_reach_from_value(view, p.value, set(linears), lambda i: False) for p in parts]
    common = sorted((reaches[0][i] + reaches[1][i], i) for i in set(reaches[0]) & set(reaches[1]))
    if not common:
        raise BlockError("the MLP's two projections never meet")
    meet = common[0][1]
    behind = view.reach([meet], False, SEARCH_DEPTH)
    roles, activation = {}, None
    for p, reach in zip(parts, reaches):
        between = sorted({view.nodes[i].op_type for i in reach if i in behind and i != meet} - set(REVIEW_OPS))
        if between:
            roles["gate"], activation = p, between
        else:
            roles["up"] = p
    if activation not in (["Mul", "Sigmoid"], ["Swish"]) or len(roles) != 2:
        raise BlockError(f"unknown MLP activation: found {activation or 'none'} between the gate projection and "
                         f"the {view.nodes[meet].op_type} with up; expected SiLU (x * Sigmoid(x) or Swish)")
    return roles, meet


def norm_weight(view: GraphView, value: str, hidden_size: int, what: str) -> Weight:
    """The RMSNorm weight that produced ``value`` (looking through reshapes and casts)."""
    while value in view.producer:
        node = view.nodes[view.producer[value]]
        if node.op_type in NORM_OPS:
            found = weight_of(view, node.input[NORM_OPS[node.op_type]])
            if found is not None:
                return found[0]
            break
        if node.op_type == "LayerNormalization":
            raise BlockError(f"{what}: found LayerNormalization (mean-centred); expected RMSNorm")
        if node.op_type == "Mul":
            for k in (0, 1):
                found = weight_of(view, node.input[k])
                if found and found[0].dims == (hidden_size,):
                    _check_rms(view, view.producer[value], what)
                    return found[0]
            break
        if node.op_type not in SHAPE_OPS:
            break
        value = node.input[0]
    op = view.nodes[view.producer[value]].op_type if value in view.producer else f"graph input {value!r}"
    raise BlockError(f"{what}: found {op}; expected an RMSNorm (Mul by a [{hidden_size}] weight of "
                     "x * 1/sqrt(mean(x^2) + eps), or SimplifiedLayerNormalization)")


def _check_rms(view: GraphView, mul: int, what: str) -> None:
    """The Mul's other side must hold mean(x^2) of an uncentred x (a centred one is LayerNorm)."""
    squares = []
    for i in view.reach([mul], False, 8):
        node = view.nodes[i]
        if node.op_type == "ReduceMean" and node.input[0] in view.producer:
            square = view.nodes[view.producer[node.input[0]]]
            if square.op_type in ("Pow", "Mul"):
                squares.append(square)
    if not squares:
        raise BlockError(f"{what}: the Mul by the norm weight does not follow a mean of squares; expected RMSNorm")
    centred = [s for s in squares if s.input[0] in view.producer and view.nodes[view.producer[s.input[0]]].op_type == "Sub"]
    if len(centred) == len(squares):
        raise BlockError(f"{what}: found a mean-centred (LayerNorm) pattern; expected RMSNorm")
