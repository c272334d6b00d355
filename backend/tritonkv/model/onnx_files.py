"""Which files make an ONNX checkpoint: the graph, its external data, and the directory of
its config.json / tokenizer.json.

Rules:
- ``checkpoint`` names a directory or an ``.onnx`` file; a file's directory holds config.json.
- A directory with ``*.safetensors`` is a safetensors checkpoint even if it also has ONNX files.
- In a directory the graph is ``model.onnx``, else optimum's decoder names in the order below,
  else the only ``*.onnx`` file; several other candidates are an error naming them.
"""

from __future__ import annotations

import glob
import os

# optimum's decoder file names, the merged / with-past ones first (they hold the same weights)
GRAPH_NAMES = ("model.onnx", "decoder_model_merged.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


def checkpoint_directory(checkpoint: str) -> str:
    """The directory holding config.json (and tokenizer.json) for ``checkpoint``."""
    if checkpoint.endswith(".onnx") and os.path.isfile(checkpoint):
        return os.path.dirname(os.path.abspath(checkpoint))
    return checkpoint


def is_onnx_checkpoint(checkpoint: str) -> bool:
    if os.path.isfile(checkpoint):
        return checkpoint.endswith(".onnx")
    return (os.path.isdir(checkpoint) and not glob.glob(os.path.join(checkpoint, "*.safetensors"))
            and bool(glob.glob(os.path.join(checkpoint, "*.onnx"))))


def onnx_graph_path(checkpoint: str) -> str:
    if os.path.isfile(checkpoint):
        return checkpoint
    for name in GRAPH_NAMES:
        path = os.path.join(checkpoint, name)
        if os.path.isfile(path):
            return path
    found = sorted(glob.glob(os.path.join(checkpoint, "*.onnx")))
    if len(found) == 1:
        return found[0]
    names = [os.path.basename(p) for p in found]
    raise ValueError(f"{checkpoint!r} has {len(found)} ONNX graphs {names}; name one of them as the "
                     f"checkpoint, or keep one of {list(GRAPH_NAMES)}")


def weight_files(checkpoint: str) -> list[str]:
    """The files whose bytes are the weights (for stamping a shared pool's description)."""
    if not is_onnx_checkpoint(checkpoint):
        return sorted(glob.glob(os.path.join(checkpoint, "*.safetensors")))
    graph = onnx_graph_path(checkpoint)
    from tritonkv.model.onnx_graph import external_data_files

    return [graph, *external_data_files(graph)]
