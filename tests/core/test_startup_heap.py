"""The startup heap leaves the collector's scans (core/startup_heap.py): what is alive when a
process's startup ends is frozen, and the engine core freezes once its engine is built."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import torch

from tritonkv.config import EngineConfig


def test_objects_alive_at_the_freeze_are_no_longer_scanned():
    code = (
        "import gc\n"
        "from tritonkv.core.startup_heap import freeze_startup_heap\n"
        "kept = [[i] for i in range(50_000)]\n"
        "frozen = freeze_startup_heap()\n"
        "later = [[i] for i in range(10)]\n"
        "scanned = {id(o) for o in gc.get_objects()}\n"
        "print(frozen >= 50_000, id(kept[123]) in scanned, id(later[3]) in scanned)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "True"]


def test_the_engine_core_freezes_its_heap_once_its_engine_is_built(monkeypatch):
    from tritonkv.core import proc

    engine = SimpleNamespace(after_emit=None, checkpoint="ckpt", model_config=SimpleNamespace(vocab_size=9),
                             max_model_len=8, context_limit=8, pool=SimpleNamespace(num_blocks=4),
                             kv_caches=[[torch.zeros(1)]], device=torch.device("cpu"))
    core = proc.EngineCore.__new__(proc.EngineCore)  # (no socket or lock: _load alone)
    core.name, core.config, core.gpu_instance, core.device_id = "t-cpu0", EngineConfig(checkpoint="ckpt"), False, 0
    frozen_with = []
    monkeypatch.setattr("tritonkv.engine.factory.build_engine", lambda *a, **k: engine)
    monkeypatch.setattr(proc, "freeze_startup_heap", lambda: frozen_with.append(getattr(core, "engine", None)) or 0)
    core._load()
    assert frozen_with == [engine]
