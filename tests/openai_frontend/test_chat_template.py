"""Chat templates render exactly as transformers' apply_chat_template renders them."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from tritonkv.model.demo_checkpoint import BOS, DEMO_CHAT_TEMPLATE, EOS, byte_level_tokenizer
from tritonkv.openai_frontend.chat_template import ChatTemplate, ChatTemplateError

# Zephyr / ChatML-like templates of the kind checkpoints ship: loop controls, namespace-free
# conditionals, raise_exception, bos/eos tokens, the generation prompt, whitespace control
LLAMA2_STYLE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
CHATML = (
    "{% for message in messages %}\n"
    "{%- if loop.first and message.role != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif -%}\n"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% if message.role == 'assistant' %}{% continue %}{% endif %}"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{{ messages | tojson }}"
)
CHATS = [
    [{"role": "user", "content": "Hi <b>there</b> & \u00e9t\u00e9"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One"},
     {"role": "assistant", "content": "Two"}, {"role": "user", "content": " Three "}],
]


def make_checkpoint(path, template):
    byte_level_tokenizer().save(str(path / "tokenizer.json"))
    cfg = {"bos_token": BOS, "eos_token": EOS}
    if template is not None:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("template", [DEMO_CHAT_TEMPLATE, LLAMA2_STYLE, CHATML], ids=["demo", "llama2", "chatml"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_and_tokens_equal_transformers(tmp_path, template, generation_prompt):
    ckpt = make_checkpoint(tmp_path, template)
    hf = PreTrainedTokenizerFast(tokenizer_file=f"{ckpt}/tokenizer.json", bos_token=BOS, eos_token=EOS)
    ours = ChatTemplate.from_checkpoint(ckpt)
    assert ours.special_tokens == {"bos_token": BOS, "eos_token": EOS}
    for chat in CHATS:
        expected = hf.apply_chat_template(chat, chat_template=template, tokenize=False,
                                          add_generation_prompt=generation_prompt)
        assert ours.render(chat, add_generation_prompt=generation_prompt) == expected
        expected_ids = hf.apply_chat_template(chat, chat_template=template, tokenize=True,
                                              add_generation_prompt=generation_prompt, return_dict=False)
        text = ours.render(chat, add_generation_prompt=generation_prompt)
        assert hf.encode(text, add_special_tokens=False) == list(expected_ids)


def test_the_demo_template_text():
    text = ChatTemplate(DEMO_CHAT_TEMPLATE, {"bos_token": BOS}).render(CHATS[1])
    assert text == "<s><|system|>\nBe brief.\n<|user|>\nOne\n<|assistant|>\nTwo\n<|user|>\n Three \n<|assistant|>\n"


def test_raise_exception_becomes_a_template_error_with_its_message(tmp_path):
    ours = ChatTemplate.from_checkpoint(make_checkpoint(tmp_path, LLAMA2_STYLE))
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        ours.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_the_sandbox_refuses_python_internals(tmp_path):
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="unsafe|access"):
        ChatTemplate(evil, {}).render(CHATS[0])
    mutate = "{% set _ = messages.append(1) %}x"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(mutate, {}).render(CHATS[0])


def test_no_template_and_named_templates(tmp_path):
    assert ChatTemplate.from_checkpoint(make_checkpoint(tmp_path, None)) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": BOS}, "chat_template": [{"name": "tool_use", "template": "T"},
                                                          {"name": "default", "template": "D{{ bos_token }}"}]}))
    assert ChatTemplate.from_checkpoint(str(tmp_path)).render(CHATS[0]) == "D<s>"
