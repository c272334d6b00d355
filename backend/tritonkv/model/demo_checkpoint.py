"""The embedded demo model: a small Llama checkpoint generated from a fixed seed.

No hub access: config.json, model.safetensors (seeded normal weights), a byte-level
tokenizer.json (256 byte tokens + <s>, </s>) and tokenizer_config.json with a simple chat
template are written by this module. The same version string always yields byte-identical
files. The weights are random: the model answers printable babble, never sense; it exists to
exercise the serving path end to end.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

DEMO_VERSION = "demo-llama-v3"  # v3: v2 + the chat template
BOS, EOS = "<s>", "</s>"
# one line per message: "<|role|>\ncontent\n"; the generation prompt opens the assistant's
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 258,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "torch_dtype": "float32",
}


def default_demo_dir() -> str:
    root = os.environ.get("TRITONKV_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tritonkv")
    return os.path.join(root, DEMO_VERSION)


def byte_level_tokenizer():
    """A byte-level BPE with no merges: every UTF-8 byte is one token, ids 0..255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, 256)]
    )
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def demo_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]

    def normal(*shape, std=0.05):
        return torch.randn(*shape, generator=gen) * std

    state = {"model.embed_tokens.weight": normal(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = normal(q_dim, h)
        state[p + "self_attn.k_proj.weight"] = normal(kv_dim, h)
        state[p + "self_attn.v_proj.weight"] = normal(kv_dim, h)
        state[p + "self_attn.o_proj.weight"] = normal(h, q_dim)
        state[p + "mlp.gate_proj.weight"] = normal(inter, h)
        state[p + "mlp.up_proj.weight"] = normal(inter, h)
        state[p + "mlp.down_proj.weight"] = normal(h, inter)
        state[p + "input_layernorm.weight"] = torch.ones(h)
        state[p + "post_attention_layernorm.weight"] = torch.ones(h)
    # Readable babble: only printable ASCII bytes and newline get non-zero output weights,
    # so greedy text stays printable; the special tokens (and so EOS) are never favoured.
    head = normal(cfg["vocab_size"], h, std=0.5)
    printable = torch.zeros(cfg["vocab_size"], dtype=torch.bool)
    printable[32:127] = True
    printable[10] = True
    head[~printable] = 0.0
    state["lm_head.weight"] = head
    return state


def write_checkpoint(path: str, cfg: dict, state: dict, tokenizer=None, chat_template: str | None = None) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            special = {"bos_token": BOS, "eos_token": EOS}
            json.dump(special if chat_template is None else {**special, "chat_template": chat_template}, f)


def ensure_demo_checkpoint(path: str | None = None) -> str:
    """Create the demo checkpoint at ``path`` once (safe when several processes race)."""
    path = path or default_demo_dir()
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            return path
        tmp = tempfile.mkdtemp(dir=parent)
        write_checkpoint(tmp, DEMO_CONFIG, demo_state_dict(DEMO_CONFIG), byte_level_tokenizer(),
                         DEMO_CHAT_TEMPLATE)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
    return path
