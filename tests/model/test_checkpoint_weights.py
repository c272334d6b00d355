"""A checkpoint weight the model has no place for fails the load (it would change the output)."""

import pytest
import torch
import transformers

from tiny_models import BASE
from tritonkv.model.checkpoint import load_model


def _llama_dir(path, **overrides) -> str:
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def test_llama_with_attention_bias_is_refused_naming_the_o_proj_bias(tmp_path):
    path = _llama_dir(tmp_path, attention_bias=True)
    with pytest.raises(ValueError, match=r"does not use: \['model\.layers\.0\.self_attn\.o_proj\.bias'"):
        load_model(path, torch.device("cpu"), torch.float32)


def test_llama_with_mlp_bias_is_refused_naming_the_biases(tmp_path):
    path = _llama_dir(tmp_path, mlp_bias=True)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.bias"):
        load_model(path, torch.device("cpu"), torch.float32)


def test_plain_llama_loads_every_weight(tmp_path):
    path = _llama_dir(tmp_path)
    model = load_model(path, torch.device("cpu"), torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(path)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, hf.model.layers[1].mlp.down_proj.weight)
