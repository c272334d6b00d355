"""``python -m tritonkv.model.onnx_export HF_DIR OUT_DIR``: an HF Llama / Mistral / Qwen2
checkpoint as an ONNX directory tritonkv serves (``tritonkv serve OUT_DIR``).

OUT_DIR gets model.onnx (weights as external data when the model passes protobuf's 2 GB),
config.json, generation_config.json and the tokenizer files. The graph computes logits from
``input_ids`` and ``attention_mask`` (torch.onnx, TorchScript path by default; ``--dynamo``
takes the torch.export path, which needs the onnxscript package). Needs ``transformers``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")


class LogitsOnly(torch.nn.Module):
    """input_ids, attention_mask -> logits (no KV outputs: tritonkv keeps its own cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_model(model, source_dir: str, out_dir: str, dynamo: bool = False) -> str:
    """Export an HF causal LM (in memory) to ``out_dir``, beside the files of ``source_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    for name in COPIED_FILES:
        if os.path.isfile(os.path.join(source_dir, name)):
            shutil.copy(os.path.join(source_dir, name), out_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    path = os.path.join(out_dir, "model.onnx")
    wrapper = LogitsOnly(model).eval()
    if dynamo:
        seq = torch.export.Dim("sequence", max=model.config.max_position_embeddings)
        torch.onnx.export(wrapper, (ids, torch.ones_like(ids)), path, dynamo=True, external_data=True,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes=({1: seq}, {1: seq}))
    else:
        axes = {0: "batch", 1: "sequence"}
        torch.onnx.export(wrapper, (ids, torch.ones_like(ids)), path, dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes})
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonkv.model.onnx_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="HF checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("out_dir", help="directory to write (model.onnx, config.json, tokenizer files)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the exported weights (default: %(default)s; bfloat16 needs --dynamo)")
    parser.add_argument("--dynamo", action="store_true", help="torch.export path (needs onnxscript)")
    args = parser.parse_args(argv)
    if args.dtype == "bfloat16" and not args.dynamo:
        parser.error("--dtype bfloat16 needs --dynamo (the TorchScript exporter has no bfloat16)")
    try:
        import transformers
    except ImportError:
        parser.error("exporting needs transformers: pip install transformers")
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=getattr(torch, args.dtype))
        export_model(model.eval(), args.hf_dir, args.out_dir, args.dynamo)
    print(f"wrote {args.out_dir}; serve it with: tritonkv serve {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
