"""The model registry: architecture name -> class, attention facts and weight names; nothing
else names an architecture, so a new one is an entry here."""

import pytest
import torch

from tritonkv.model import registry
from tritonkv.model.llama import CausalLM
from tritonkv.model.model_config import ModelConfig

SHAPE = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2)


@pytest.mark.parametrize("arch, extra, qkv_bias, window", [
    ("LlamaForCausalLM", {"sliding_window": 16}, False, None),  # Llama has no window
    ("LlamaForCausalLM", {"attention_bias": True}, True, None),
    ("MistralForCausalLM", {"sliding_window": 16}, False, 16),
    ("Qwen2ForCausalLM", {"sliding_window": 16}, True, None),  # use_sliding_window off
    ("Qwen2ForCausalLM", {"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 0}, True, 16),
])
def test_each_architecture_reads_its_attention_from_config_json(arch, extra, qkv_bias, window):
    cfg = ModelConfig.from_dict({"architectures": [arch], **SHAPE, **extra})
    assert (cfg.architecture, cfg.qkv_bias, cfg.sliding_window) == (arch, qkv_bias, window)
    with torch.device("meta"):
        model = registry.build_model(cfg)
    assert type(model) is CausalLM
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == qkv_bias


def test_an_unknown_architecture_names_the_served_ones():
    with pytest.raises(ValueError, match=r"'GPT2LMHeadModel' is not supported; tritonkv serves LlamaForCausalLM, "
                                         r"MistralForCausalLM, Qwen2ForCausalLM"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"], **SHAPE})


def test_a_qwen2_window_on_some_layers_only_is_refused():
    with pytest.raises(ValueError, match="slides a window on 1 of its 2 layers"):
        ModelConfig.from_dict({"architectures": ["Qwen2ForCausalLM"], **SHAPE, "sliding_window": 16,
                               "use_sliding_window": True, "max_window_layers": 1})


def test_weight_names_drop_what_the_model_recomputes():
    name = registry.ARCHITECTURES["LlamaForCausalLM"].weight_name
    assert name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert name("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"


class TinyModel(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg


def test_a_new_architecture_is_one_entry(monkeypatch):
    entry = registry.Architecture(__name__, "TinyModel", lambda cfg: (False, cfg.get("window")))
    monkeypatch.setitem(registry.ARCHITECTURES, "TinyForCausalLM", entry)
    cfg = ModelConfig.from_dict({"architectures": ["TinyForCausalLM"], **SHAPE, "window": 4})
    assert cfg.sliding_window == 4 and type(registry.build_model(cfg)) is TinyModel
