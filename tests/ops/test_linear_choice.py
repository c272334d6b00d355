"""Which GEMM a linear layer runs (ops/linear.py): the measured table decides per GPU, weight
shape and row bucket; with every shape forced onto the skinny kernel a CUDA engine gives the
same greedy tokens as torch's GEMMs."""

import pytest
import torch
from torch import nn

from engine_helpers import TEST_DEVICE, engine_prefill_logits, make_engine, run_conversations
from tiny_models import build_tiny_checkpoint
from tritonkv.ops.linear import bucket, skinny_choices, use_skinny_gemm


def test_rows_round_up_to_the_measured_buckets():
    assert [bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert bucket(17) is None


def test_choices_come_from_the_table_for_this_gpu_and_shape_only():
    cfg = (32, 256, 1, 4, 4, True)
    wins = {("GPU A", 4096, 4096, 1): cfg, ("GPU A", 4096, 4096, 4): cfg, ("GPU A", 6144, 4096, 1): cfg,
            ("GPU B", 4096, 4096, 8): cfg}
    assert skinny_choices("GPU A", 4096, 4096, wins) == {1: cfg, 4: cfg}
    assert skinny_choices("GPU B", 4096, 4096, wins) == {8: cfg}
    assert skinny_choices("GPU A", 4096, 14336, wins) == {}


def test_cpu_layers_are_left_to_torch():
    model = nn.Sequential(nn.Linear(8, 4))
    assert use_skinny_gemm(model, {("cpu", 4, 8, 1): (16, 32, 1, 4, 2, True)}) == []
    assert "forward" not in vars(model[0])


def _force_skinny(engine):
    """A table that sends every linear layer of the engine's model to the kernel at every bucket
    (split-K at 2 rows, the GEMV at 1 row), as if each had measured faster."""
    name = torch.cuda.get_device_name(0)
    wins = {(name, *m.weight.shape, b): (16, 64, 2 if b == 2 else 1, 4, 3, b != 1)
            for m in engine.model.modules() if isinstance(m, nn.Linear) for b in (1, 2, 4, 8, 16)}
    assert len(use_skinny_gemm(engine.model, wins)) == 4 * engine.model_config.num_layers + 1


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    build_tiny_checkpoint("llama", path)
    return path


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="the skinny GEMM runs on CUDA (TRITONKV_TEST_DEVICE=cuda)")
def test_skinny_layers_give_torch_logits(llama):
    """A 13-token prefill (13 rows: every layer at the 16-row bucket) and a 1-token one."""
    torch_engine = make_engine(llama, dtype="bfloat16", enable_cuda_graphs=False)
    engine = make_engine(llama, dtype="bfloat16", enable_cuda_graphs=False)
    _force_skinny(engine)
    for ids in ([1] + list(range(3, 15)), [1]):
        ref = engine_prefill_logits(torch_engine, ids)
        got = engine_prefill_logits(engine, ids)
        torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="the skinny GEMM runs on CUDA (TRITONKV_TEST_DEVICE=cuda)")
def test_skinny_layers_in_decode_graphs_equal_eager(llama):
    """Graphs captured with the kernel replay the eager steps' greedy tokens exactly."""
    prompts = [[1] + [(7 * i + 3 * j) % 90 + 3 for j in range(5 + 4 * i)] for i in range(3)]
    runs = []
    for graphs in (True, False):
        engine = make_engine(llama, dtype="bfloat16", enable_cuda_graphs=False)
        _force_skinny(engine)
        if graphs:
            engine.runner.capture_graphs()
        runs.append([c.token_ids for c in run_conversations(engine, prompts, 12)])
        assert not graphs or engine.step_times.kinds["decode_graph"].steps > 0
    assert runs[0] == runs[1]
