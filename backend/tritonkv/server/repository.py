"""The model repository a launch serves: a copy of the source repository with its
parameters, instance groups and model names rewritten.

A model in the repository is ``<name>/config.pbtxt`` (``backend: "tritonkv"``, engine
settings as ``parameters``; the checkpoint is one of them) and an empty version directory
``<name>/1/``: the code is the installed backend (``install_backend.py``), not a file per
model. ``stateless_name`` renames the model without a sequence batcher (``llm_stateless``)
so that clients written for another name (Triton's vLLM backend samples use ``vllm_model``)
run unchanged.
"""

from __future__ import annotations

import os
import re
import shutil

STATELESS_MODEL = "llm_stateless"
CONVERSATION_MODEL = "llm"
_NAME_RE = re.compile(r'^name: "[^"]*"', re.M)
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_model_name(name: str, flag: str = "--stateless-model-name") -> str:
    """A Triton model name usable as a directory and in URLs; raises ValueError naming ``flag``."""
    if not _MODEL_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{flag} {name!r}: letters, digits, '_', '.', '-' (not first), at most 128")
    if name == CONVERSATION_MODEL:
        raise ValueError(f"{flag} {name!r}: that is the conversation model's name")
    return name


def set_parameter(pbtxt: str, key: str, value: str) -> str:
    entry = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
    pattern = re.compile(r'parameters \{ key: "' + re.escape(key) + r'" value: \{ string_value: "[^"]*" \} \}')
    if pattern.search(pbtxt):
        return pattern.sub(lambda _: entry, pbtxt)
    return pbtxt.rstrip() + "\n" + entry + "\n"


def write_repository(dest: str, source: str, checkpoint: str | None, instances: int, extra_params: dict | None,
                     instance_kind: str, stateless_name: str = STATELESS_MODEL) -> str:
    """Copy ``source`` to ``dest`` with parameters, instance counts and the stateless model's
    name rewritten; returns ``dest``."""
    shutil.copytree(source, dest, dirs_exist_ok=True)
    for model in sorted(os.listdir(dest)):
        cfg_path = os.path.join(dest, model, "config.pbtxt")
        if not os.path.isfile(cfg_path):
            continue
        with open(cfg_path) as f:
            text = f.read()
        params = dict(extra_params or {})
        if checkpoint is not None:
            params["checkpoint"] = checkpoint
        for key, value in params.items():
            text = set_parameter(text, key, str(value))
        group = f"instance_group [ {{ count: {instances} kind: {instance_kind} }} ]"
        text, n = re.subn(r"^instance_group \[.*?\]", group, text, flags=re.S | re.M)
        if n == 0:
            text = text.rstrip() + "\n" + group + "\n"
        if model == STATELESS_MODEL and stateless_name != STATELESS_MODEL:
            text = _NAME_RE.sub(f'name: "{stateless_name}"', text, count=1)
            os.rename(os.path.join(dest, model), os.path.join(dest, stateless_name))
            cfg_path = os.path.join(dest, stateless_name, "config.pbtxt")
        with open(cfg_path, "w") as f:
            f.write(text)
    return dest
