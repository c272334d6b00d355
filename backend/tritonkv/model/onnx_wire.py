"""Parse an .onnx file without its weights: a scan of protobuf's wire format over a memory map.

The top graph's initializers keep every field but ``raw_data``, whose byte range in the file is
returned instead; so a graph that stores its weights inside (under protobuf's 2 GB) is read
like one with external data: each weight from a memory map of its bytes, when it is loaded.
Field numbers (onnx.proto): ModelProto.graph = 7, GraphProto.initializer = 5,
TensorProto.name = 8, TensorProto.raw_data = 9.
"""

from __future__ import annotations

import mmap
import os

import onnx

MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9
LENGTH_DELIMITED = 2


class Truncated(ValueError):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise Truncated("the file ends inside a field")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf, start: int, end: int):
    """(field number, wire type, value start, value end, field start) of each field."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, value_end = _varint(buf, pos, end)
        elif wire == 1:
            value_end = pos + 8
        elif wire == 5:
            value_end = pos + 4
        elif wire == LENGTH_DELIMITED:
            n, pos = _varint(buf, pos, end)
            value_end = pos + n
        else:
            raise ValueError(f"wire type {wire} at byte {field_start}: not a protobuf message")
        if value_end > end or field == 0:
            raise Truncated(f"a field at byte {field_start} runs past the end of its message")
        yield field, wire, pos, value_end, field_start
        pos = value_end


def _key(field: int, length: int) -> bytes:
    out = bytearray()
    for value in ((field << 3) | LENGTH_DELIMITED, length):
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def load_without_weights(path: str) -> tuple[onnx.ModelProto, dict[str, tuple[int, int]]]:
    """The model with the top graph's ``raw_data`` left in the file: (model, name -> (offset, length))."""
    size = os.path.getsize(path)
    if size == 0:
        raise Truncated("the file is empty")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        ranges: dict[str, tuple[int, int]] = {}
        model = bytearray()
        for field, wire, start, end, field_start in _fields(buf, 0, size):
            if field != MODEL_GRAPH or wire != LENGTH_DELIMITED:
                model += buf[field_start:end]
                continue
            graph = bytearray()
            for g_field, g_wire, g_start, g_end, g_field_start in _fields(buf, start, end):
                if g_field != GRAPH_INITIALIZER or g_wire != LENGTH_DELIMITED:
                    graph += buf[g_field_start:g_end]
                    continue
                tensor, raw = bytearray(), None
                for t_field, t_wire, t_start, t_end, t_field_start in _fields(buf, g_start, g_end):
                    if t_field == TENSOR_RAW_DATA and t_wire == LENGTH_DELIMITED:
                        raw = (t_start, t_end - t_start)
                    else:
                        tensor += buf[t_field_start:t_end]
                if raw is not None:
                    ranges[onnx.TensorProto.FromString(bytes(tensor)).name] = raw
                graph += _key(GRAPH_INITIALIZER, len(tensor)) + tensor
            model += _key(MODEL_GRAPH, len(graph)) + graph
    return onnx.ModelProto.FromString(bytes(model)), ranges
