"""ops.dispatch: CPU tensors -> torch (impl='cpu'), CUDA (or impl='triton') -> kernels,
impl='reference' -> the plain oracle; mixed batches."""

import pytest
import torch
from kvcase import DEVICE, INTERPRET, make_case, poisoned_like, rel_err

from tritonkv.ops import dispatch
from tritonkv.ops.paged_attention import paged_attention_reference, write_kv_reference
from tritonkv.ops.quant import paged_attention_quant_reference


def test_cpu_goes_to_the_batched_torch_path_and_reference_on_request():
    c = make_case([3, 20], [1, 4], 4, 2, 64, device="cpu")
    ref = paged_attention_reference(*c.args())
    out = dispatch.paged_attention(*c.args())  # original positional signature
    # ops/cpu_attention.py: same function, other summation order; q/out are bf16 here
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(dispatch.paged_attention(*c.args(), impl="cpu"), out)
    assert torch.equal(dispatch.paged_attention(*c.args(), impl="reference"), ref)
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch.paged_attention(*c.args(), impl="torch")  # the old name of 'cpu'


@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
def test_mixed_batch_through_dispatcher(kv_dtype):
    """Some sequences decode (1 row), others extend: one write_kv, one paged_attention."""
    if INTERPRET:
        lens, q_lens, heads, d = [9, 40, 1, 26], [1, 12, 1, 26], (8, 2), 64
    else:
        lens, q_lens, heads, d = [900, 4000, 1, 2600, 70], [1, 1200, 1, 2600, 1], (32, 8), 128
    c = make_case(lens, q_lens, *heads, d, kv_dtype=kv_dtype)
    # write the chunk's own K/V through the dispatcher, then attend
    page = c.k_cache.shape[1]
    slots, key_rows = [], []
    for i, (n, ql) in enumerate(zip(lens, q_lens)):
        for p in range(n - ql, n):
            slots.append(int(c.block_tables[i, p // page]) * page + p % page)
    slots = torch.tensor(slots, dtype=torch.int32, device=c.q.device)
    num_tokens = slots.numel()
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(num_tokens, heads[1], d, generator=gen).to(torch.bfloat16).to(c.q.device)
    val = torch.randn(num_tokens, heads[1], d, generator=gen).to(torch.bfloat16).to(c.q.device)
    kw = {} if kv_dtype is None else dict(k_scale=c.k_scale, v_scale=c.v_scale)
    rk, rv = c.k_cache.clone(), c.v_cache.clone()
    rks = c.k_scale.clone() if kv_dtype is not None else None
    rvs = c.v_scale.clone() if kv_dtype is not None else None
    dispatch.write_kv(c.k_cache, c.v_cache, key, val, slots, impl="triton", **kw)
    dispatch.write_kv(rk, rv, key, val, slots, impl="cpu",
                      **({} if kv_dtype is None else dict(k_scale=rks, v_scale=rvs)))
    if kv_dtype is None:
        assert torch.equal(c.k_cache, rk) and torch.equal(c.v_cache, rv)
        ref = paged_attention_reference(*c.args())
    else:
        ref = paged_attention_quant_reference(*c.args(), k_scale=rks, v_scale=rvs)
    out = dispatch.paged_attention(*c.args(), max_query_len=c.max_query_len, impl="triton",
                                   out=poisoned_like(c.q), **kw)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-2


def test_decode_with_mass_through_dispatcher():
    lens = [3, 40, 17] if INTERPRET else [3, 4000, 1700]
    c = make_case(lens, [1] * len(lens), 8, 2, 64)
    out, mass = dispatch.paged_attention(*c.args(), 16, 2, max_query_len=1, impl="triton",
                                         return_attention_mass=True)
    rout, rmass = dispatch.paged_attention(*c.args(), 16, 2, max_query_len=1, impl="cpu",
                                           return_attention_mass=True)
    assert rel_err(out, rout) < 2e-2
    assert rel_err(mass, rmass) < 2e-2


@pytest.mark.skipif(DEVICE != "cuda", reason="auto-dispatch to kernels needs CUDA tensors")
def test_cuda_auto_dispatch():
    c = make_case([5, 3000], [1, 1], 32, 8, 128)
    out = dispatch.paged_attention(*c.args())  # no max_query_len: read from the device
    assert rel_err(out, paged_attention_reference(*c.args())) < 2e-2
    key = torch.randn(2, 8, 128, device="cuda", dtype=torch.bfloat16)
    rk, rv = c.k_cache.clone(), c.v_cache.clone()
    slots = torch.tensor([7, -1], dtype=torch.int32, device="cuda")
    dispatch.write_kv(c.k_cache, c.v_cache, key, key, slots)
    write_kv_reference(rk, rv, key, key, slots)
    assert torch.equal(c.k_cache, rk)


def test_decode_adds_block_mass_through_dispatcher():
    """``block_mass=``: the kernel path and the CPU path add the same per-block mass."""
    lens = [3, 40, 17] if INTERPRET else [3, 4000, 1700]
    c = make_case(lens, [1] * len(lens), 8, 2, 64)
    width = c.block_tables.shape[1]
    start = torch.rand(len(lens), width, device=c.q.device)
    kern, cpu = start.clone(), start.clone()
    out = dispatch.paged_attention(*c.args(), max_query_len=1, impl="triton", block_mass=kern)
    rout = dispatch.paged_attention(*c.args(), max_query_len=1, impl="cpu", block_mass=cpu)
    assert rel_err(out, rout) < 2e-2
    torch.testing.assert_close(kern, cpu, atol=2e-3, rtol=2e-2)
    assert (kern - start).sum(1).cpu().tolist() == pytest.approx([8.0] * len(lens), rel=2e-2)


def test_one_decode_plan_per_step_serves_every_layer(monkeypatch):
    """The split heuristic runs once per step (ops.dispatch.plan_step), not per layer launch."""
    import tritonkv.kernels.decode_plan as decode_plan
    from tritonkv.ops.attention_batch import AttentionBatch

    c = make_case([9, 40, 23], [1, 1, 1], 4, 2, 64)
    made = []
    real = decode_plan.plan_decode
    monkeypatch.setattr(decode_plan, "plan_decode", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    batch = AttentionBatch(positions=None, slot_mapping=None, block_tables=c.block_tables, seq_lens=c.seq_lens,
                           query_start_loc=c.query_start_loc, max_query_len=1, max_seq_len=40)
    assert dispatch.plan_step(batch, c.k_cache, c.v_cache, c.q.dtype, impl="triton").decode_plan is made[0]
    ref = paged_attention_reference(*c.args())
    for _ in range(3):  # three layers
        out = dispatch.paged_attention(*c.args(), max_query_len=1, max_seq_len=40, impl="triton",
                                       decode_plan=batch.decode_plan)
        assert rel_err(out, ref) < 2e-2
    assert len(made) == 1
    # a prefill step plans nothing; a CPU step (no kernel) neither
    prefill = AttentionBatch(None, None, c.block_tables, c.seq_lens, c.query_start_loc, max_query_len=5)
    assert dispatch.plan_step(prefill, c.k_cache, c.v_cache, c.q.dtype, impl="triton").decode_plan is None
    cpu = AttentionBatch(None, None, c.block_tables, c.seq_lens, c.query_start_loc, max_query_len=1)
    assert dispatch.plan_step(cpu, c.k_cache, c.v_cache, c.q.dtype, impl="cpu").decode_plan is None
    assert len(made) == 1
