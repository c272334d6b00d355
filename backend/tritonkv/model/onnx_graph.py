"""An ONNX graph as tritonkv reads it: its weights, read lazily one at a time, and its data flow.

Memory rule: the graph is parsed without its weights (onnx_wire.py leaves the top graph's
``raw_data`` in the file; external data stays in its files); each weight is read only when it is
loaded, from a memory map of its own byte range (unmapped once the weight is copied into its
torch tensor), so loading holds the model's weights plus one weight.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from tritonkv.model.onnx_wire import load_without_weights

FLOAT_TYPES = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
               TensorProto.BFLOAT16: torch.bfloat16, TensorProto.DOUBLE: torch.float64}
SHAPE_ONLY_OPS = ("Shape", "Size")


def type_name(data_type: int) -> str:
    return TensorProto.DataType.Name(data_type).lower()


@dataclass
class Weight:
    """One initializer (or Constant node tensor); its bytes stay on disk until ``load``."""

    name: str
    tensor: TensorProto
    base_dir: str
    in_file: tuple[str, int, int] | None = None  # (graph file, offset, length) of raw_data left there

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(self.tensor.dims)

    @property
    def data_type(self) -> int:
        return self.tensor.data_type

    @property
    def is_float(self) -> bool:
        return self.data_type in FLOAT_TYPES

    def describe(self) -> str:
        return f"{self.name!r} {list(self.dims)} {type_name(self.data_type)}"

    def nbytes(self) -> int:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(self.data_type).itemsize
        return int(np.prod(self.dims, dtype=np.int64)) * itemsize

    def byte_range(self) -> tuple[str, int, int] | None:
        """(file, offset, length) of the weight's bytes, checked against its shape and the file;
        None when the parsed graph holds the values (typed fields)."""
        if self.in_file is not None:
            if self.in_file[2] != self.nbytes():
                raise ValueError(f"weight {self.describe()} holds {self.in_file[2]} bytes; its shape needs "
                                 f"{self.nbytes()}")
            return self.in_file
        return self.external()

    def external(self) -> tuple[str, int, int] | None:
        """(path, offset, length) of an externally stored weight, checked against the file."""
        if self.tensor.data_location != TensorProto.EXTERNAL:
            return None
        info = {e.key: e.value for e in self.tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or ".." in location.replace("\\", "/").split("/"):
            raise ValueError(f"weight {self.describe()} names external data {location!r}; expected a file "
                             f"name inside {self.base_dir!r}")
        path = os.path.join(self.base_dir, location)
        offset, length = int(info.get("offset", 0)), int(info.get("length", self.nbytes()))
        if length != self.nbytes():
            raise ValueError(f"weight {self.describe()} has {length} bytes of external data; its shape needs "
                             f"{self.nbytes()}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weight {self.describe()} lives in {location!r}, which is missing "
                                    f"beside the graph in {self.base_dir!r}")
        size = os.path.getsize(path)
        if offset + length > size:
            raise ValueError(f"weight {self.describe()} needs bytes {offset}..{offset + length} of {location!r}, "
                             f"but the file has {size} bytes (truncated?)")
        return path, offset, length

    def values(self) -> np.ndarray:
        """A small tensor's values as numpy (shape constants such as a Slice's starts)."""
        where = self.byte_range()
        if where is None:
            return numpy_helper.to_array(self.tensor)
        path, offset, length = where
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        return np.frombuffer(data, dtype=onnx.helper.tensor_dtype_to_np_dtype(self.data_type)).reshape(self.dims)

    def load(self, dtype: torch.dtype, transpose: bool = False) -> torch.Tensor:
        """A new contiguous tensor in ``dtype`` (transposed for 2-D weights when asked)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only source buffers are only read
            src = self._source()
        if transpose:
            src = src.t()
        out = torch.empty(src.shape, dtype=dtype)
        out.copy_(src)
        return out

    def _source(self) -> torch.Tensor:
        if self.data_type not in FLOAT_TYPES:
            raise ValueError(f"weight {self.describe()} is not a float tensor")
        dtype, t = FLOAT_TYPES[self.data_type], self.tensor
        where = self.byte_range()
        if where is not None:
            return _map_bytes(*where).view(dtype).reshape(self.dims)
        if t.HasField("raw_data"):  # a Constant node's or a subgraph's tensor
            raw = np.frombuffer(t.raw_data, dtype=np.uint8)
            if raw.size != self.nbytes():
                raise ValueError(f"weight {self.describe()} holds {raw.size} bytes; its shape needs {self.nbytes()} "
                                 "(truncated?)")
            return torch.from_numpy(raw).view(dtype).reshape(self.dims)
        if self.data_type == TensorProto.FLOAT:
            values = torch.tensor(np.asarray(t.float_data, dtype=np.float32))
        elif self.data_type == TensorProto.DOUBLE:
            values = torch.tensor(np.asarray(t.double_data, dtype=np.float64))
        else:  # float16 / bfloat16 bit patterns, one per int32
            values = torch.tensor(np.asarray(t.int32_data, dtype=np.int32).astype(np.uint16).view(np.int16)).view(dtype)
        if values.numel() != int(np.prod(self.dims, dtype=np.int64)):
            raise ValueError(f"weight {self.describe()} holds {values.numel()} values (truncated?)")
        return values.reshape(self.dims)


def _map_bytes(path: str, offset: int, length: int) -> torch.Tensor:
    """A read-only uint8 view of a file's byte range; the mapping lives as long as the tensor
    (pages faulted in up front where the OS allows: one call instead of one fault per page)."""
    if length == 0:
        return torch.empty(0, dtype=torch.uint8)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), offset + length - start, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ, offset=start)
    return torch.frombuffer(mapped, dtype=torch.uint8, count=length, offset=offset - start)


def read_model(path: str) -> tuple[onnx.ModelProto, dict[str, tuple[int, int]]]:
    """The model without its in-file weights, and where in the file each one's bytes are."""
    try:
        return load_without_weights(path)
    except Exception as e:  # a cut field, protobuf's DecodeError and friends
        raise ValueError(f"{path!r} is not a readable ONNX model ({type(e).__name__}: {e}); "
                         "the file may be truncated or not an ONNX file") from None


def external_data_files(graph_path: str) -> list[str]:
    model, _ = read_model(graph_path)
    base = os.path.dirname(os.path.abspath(graph_path))
    names = {e.value for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return sorted(os.path.join(base, n) for n in names)


class GraphView:
    """Nodes in topological order; who produces and who consumes every value; the weights."""

    def __init__(self, nodes, weights: dict[str, Weight], inputs: list[str], outputs: list[str]):
        self.weights = weights
        self.inputs, self.outputs = inputs, outputs
        self.nodes = _topological(list(nodes), set(weights) | set(inputs))
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:  # "" marks an optional output left out
                    self.producer[out] = i
            for k, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((i, k))

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for node in self.nodes:
            counts[node.op_type] += 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def successors(self, i: int) -> list[int]:
        return sorted({j for out in self.nodes[i].output for j, _ in self.consumers.get(out, ())})

    def predecessors(self, i: int) -> list[int]:
        return sorted({self.producer[x] for x in self.nodes[i].input if x in self.producer})

    def reach(self, starts: list[int], forward: bool, limit: int, stop=None) -> dict[int, int]:
        """Nodes within ``limit`` steps of ``starts`` (node -> distance); ``stop(i)`` nodes are
        reached but not expanded. Shape / Size carry no values, only shapes: data flow stops there."""
        dist = {s: 0 for s in starts}
        queue = deque(starts)
        while queue:
            i = queue.popleft()
            if dist[i] >= limit or (stop is not None and stop(i) and dist[i] > 0):
                continue
            for j in (self.successors(i) if forward else self.predecessors(i)):
                if j not in dist and self.nodes[j].op_type not in SHAPE_ONLY_OPS:
                    dist[j] = dist[i] + 1
                    queue.append(j)
        return dist


def _topological(nodes: list, available: set[str]) -> list:
    """Kahn's order, stable with respect to the file's order (which ONNX requires to be one)."""
    known = set(available) | {o for n in nodes for o in n.output}
    pending = [sum(1 for x in set(n.input) if x and x in known and x not in available) for n in nodes]
    waiting: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        for x in set(n.input):
            if x and x in known and x not in available:
                waiting[x].append(i)
    ready = deque(i for i, c in enumerate(pending) if c == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(nodes[i])
        for out in nodes[i].output:
            for j in waiting.pop(out, ()):
                pending[j] -= 1
                if pending[j] == 0:
                    ready.append(j)
    if len(order) != len(nodes):
        raise ValueError("the ONNX graph has a cycle or nodes whose inputs are never produced")
    return order


def load_graph(path: str) -> GraphView:
    model, ranges = read_model(path)
    path = os.path.abspath(path)
    return graph_view(model, os.path.dirname(path), {n: (path, *r) for n, r in ranges.items()})


def graph_view(model: onnx.ModelProto, base_dir: str, in_file: dict | None = None) -> GraphView:
    """The decoder's graph: the top graph, or for optimum's merged decoder (one ``If`` choosing
    the with-past / without-past branch, weights shared in the top graph) its larger branch."""
    graph = model.graph
    in_file = in_file or {}
    weights = {t.name: Weight(t.name, t, base_dir, in_file.get(t.name)) for t in graph.initializer}
    nodes = list(graph.node)
    branch = _decoder_branch(nodes)
    if branch is not None:
        weights.update({t.name: Weight(t.name, t, base_dir) for t in branch.initializer})
        nodes = list(branch.node)
    for node in nodes:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            weights[node.output[0]] = Weight(node.output[0], node.attribute[0].t, base_dir)
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in weights)]
    inputs = [i.name for i in graph.input if i.name not in weights]
    return GraphView(nodes, weights, inputs, [o.name for o in graph.output])


def _decoder_branch(nodes: list):
    if any(n.op_type in ("MatMul", "Gemm") for n in nodes):
        return None
    branches = [a.g for n in nodes if n.op_type == "If" for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return max(branches, key=lambda g: len(g.node), default=None)
