"""KVSwapper: blocks copied device -> host -> device come back bit-identical in every plane
(bf16 KV; fp8 / int8 codes with their float32 scales, V token-minor), a block released and
reused in the same step is read before it is written, on the device and on the host."""

from types import SimpleNamespace

import pytest
import torch

from engine_helpers import TEST_DEVICE
from tritonkv.cache.allocate import add_kv_scales, allocate_kv_caches, kv_block_bytes
from tritonkv.cache.tier_moves import SwapPlan
from tritonkv.ops.kv_swap import KVSwapper, kv_planes

MC = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=16)
BLOCKS, BS = 10, 4


def caches(dtype):
    device = torch.device(TEST_DEVICE)
    kv = allocate_kv_caches(MC, BLOCKS, BS, dtype, device)
    if dtype in (torch.float8_e4m3fn, torch.int8):
        kv = add_kv_scales(kv, MC, BLOCKS, BS, device)
    g = torch.Generator().manual_seed(0)
    for layer in kv:
        for t in layer:  # random bytes in every page, through the logical views
            t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, generator=g,
                                                    dtype=torch.uint8)) if t.is_contiguous() else \
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    return kv


def block(kv, b):
    """Every byte of device block ``b``: each layer's K, V (and scales) page."""
    return [t[b].contiguous().view(torch.uint8).cpu().clone() for layer in kv for t in layer]


def blocks_equal(x, y):
    return all(torch.equal(a, b) for a, b in zip(x, y))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.int8])
def test_out_and_back_is_bit_identical_in_every_plane(dtype):
    kv = caches(dtype)
    swapper = KVSwapper(kv, 6, torch.device(TEST_DEVICE))
    assert swapper.block_bytes == kv_block_bytes(MC, BS, dtype)
    assert len(kv_planes(kv)) == (2 if dtype != torch.bfloat16 else 1)
    before = {b: block(kv, b) for b in (2, 5, 7)}
    swapper.run(SwapPlan(out_device=[2, 5, 7], out_host=[4, 0, 1]))  # host runs: [4], [0, 1]
    for plane in kv_planes(kv):  # the device blocks are reused for something else
        plane[:, [2, 5, 7]] = 0
    assert all(not torch.equal(block(kv, b)[0], before[b][0]) for b in (2, 5, 7))
    swapper.run(SwapPlan(in_host=[0, 1, 4], in_device=[9, 3, 8]))
    swapper.synchronize()
    assert blocks_equal(block(kv, 9), before[5]) and blocks_equal(block(kv, 3), before[7])
    assert blocks_equal(block(kv, 8), before[2])
    assert (swapper.bytes_out, swapper.bytes_in) == (3 * swapper.block_bytes, 3 * swapper.block_bytes)
    swapper.close()


def test_a_block_released_and_reused_in_one_step_is_read_before_it_is_written():
    kv = caches(torch.int8)
    swapper = KVSwapper(kv, 4, torch.device(TEST_DEVICE))
    b1, b6 = block(kv, 1), block(kv, 6)
    swapper.run(SwapPlan(out_device=[1], out_host=[0]))
    # one step: device block 6 goes out to host block 0, which the incoming block (device 1's
    # old bytes) is read from, and device 6 receives it
    swapper.run(SwapPlan(out_device=[6], out_host=[0], in_host=[0], in_device=[6]))
    swapper.synchronize()
    assert blocks_equal(block(kv, 6), b1)
    swapper.run(SwapPlan(in_host=[0], in_device=[2]))
    swapper.synchronize()
    assert blocks_equal(block(kv, 2), b6)
    swapper.close()


def test_host_rows_order_the_two_copy_streams_with_copies_long_enough_to_race():
    """(4) runs on a stream of its own (ops/kv_swap.py): a host read must wait for the
    device -> host copy that writes its rows (a block parked and loaded right after), and a
    device -> host copy must wait for the queued host read of the rows it reuses (in one
    step). Blocks of 256 KiB, 256 at a time (64 MiB: milliseconds per copy on a GPU), and no
    synchronisation between the plans."""
    mc = SimpleNamespace(num_layers=4, num_kv_heads=8, head_dim=128)
    n = 256
    device = torch.device(TEST_DEVICE)
    kv = allocate_kv_caches(mc, 2 * n + 8, 16, torch.bfloat16, device)
    (plane,) = kv_planes(kv)
    swapper = KVSwapper(kv, n, device)
    a, b = list(range(n)), list(range(n, 2 * n))
    plane[:, :n] = 1  # every byte of blocks a: 0x01
    swapper.run(SwapPlan(out_device=a, out_host=a))  # a -> host rows 0..n-1
    plane[:, :n] = 2  # the compute stream reuses blocks a (after their gather)
    swapper.run(SwapPlan(in_host=a, in_device=b))  # host rows 0..n-1 -> b: must read 0x01
    swapper.synchronize()
    assert torch.all(plane[:, n:2 * n] == 1)
    plane[:, n:2 * n] = 3
    swapper.run(SwapPlan(out_device=a, out_host=a, restore_host=a, restore_device=b, wait_restores=True))
    # ^ one step: b gets the rows' bytes (0x01) while a (0x02) goes out into the same rows
    swapper.synchronize()
    assert torch.all(plane[:, n:2 * n] == 1)
    assert torch.all(swapper.host[:n] == 2)
    swapper.close()


def test_caches_that_are_not_one_storage_are_refused():
    k = torch.zeros(BLOCKS, BS, 2, 16)
    with pytest.raises(ValueError, match="views into one"):
        kv_planes([(k, torch.zeros_like(k))])


def test_a_restore_trimmed_in_its_swap_in_step_does_not_overwrite_the_block_given_on():
    """Conversation r comes back while prompt t finds its prefix in the host tier, in one step,
    with a sliding window: r's first block drops out of the window before its copy ran, and t's
    prefix load takes that block. The block must end with t's prefix bytes, not r's old ones
    (the copy of a block released in its own step is dropped)."""
    import sys

    sys.path.insert(0, __file__.rsplit("/tests/", 1)[0] + "/tests/sched")
    from test_scheduler import running

    from tritonkv.cache.block_pool import BlockPool
    from tritonkv.cache.eviction.window import SlidingWindow
    from tritonkv.cache.host_tier import HostTier
    from tritonkv.cache.kv_cache_manager import KVCacheManager
    from tritonkv.engine.requests import SamplingParams, Turn
    from tritonkv.sched.scheduler import Scheduler

    device = torch.device(TEST_DEVICE)
    pool = BlockPool.in_process(6, BS)
    kv = KVCacheManager(pool, 0, True, SlidingWindow(BS, window=8), host=HostTier(8))
    sched = Scheduler(kv, 64, 8)
    storage = torch.zeros(1, 2, 6, BS, 2, device=device)
    swapper = KVSwapper([(storage[0, 0], storage[0, 1])], 8, device)

    def fill(seq_id, value):
        for b in kv.block_table(seq_id):
            storage[:, :, b] = value

    def run():
        swapper.run(kv.take_swaps())
        swapper.synchronize()

    p_ids = list(range(100, 109))  # p's two full blocks go to the host as prefix blocks (7.0)
    kv.start("p", p_ids)
    kv.grow("p", 9)
    fill("p", 7.0)
    kv.commit("p", p_ids)
    kv.release("p")
    run()
    r_ids = list(range(200, 211))  # r (5.0) is parked
    kv.start("r", r_ids)
    kv.grow("r", 11)
    fill("r", 5.0)
    kv.commit("r", r_ids)
    assert kv.swap_out("r")
    run()
    # f takes the whole device pool: p's blocks are demoted to the host, and so are r's
    # registered blocks (still cached there, a swap-in would take them back instead of copying)
    f_ids = list(range(300, 324))
    kv.start("f", f_ids)
    kv.grow("f", 24)
    run()
    kv.release("f")
    storage.zero_()
    r = running("r", r_ids + [7], admitted_at=0)
    r.num_computed = 11
    r.turn = Turn(prompt_ids=[7], params=SamplingParams(max_tokens=4), emit=lambda o: None)
    t = running("t", p_ids + [1, 2, 3], admitted_at=1)
    plan = sched.schedule([r, t], [])
    assert [c.seq.seq_id for c in plan] == ["t"] and kv.restoring("r")  # r waits for its copies
    swaps = kv.take_swaps()
    assert not set(swaps.restore_device) & set(swaps.in_device)
    swapper.run(swaps)
    swapper.synchronize()
    first = kv.block_table("t")[0]
    assert first in swaps.in_device and torch.all(storage[:, :, first] == 7.0)  # p's bytes, not r's
    assert all(torch.all(storage[:, :, b] == 5.0) for b in kv.block_table("r"))  # r's kept blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_scatter_takes_a_source_at_any_byte_offset(dtype):
    """The word-wide scatter (8-byte elements) of a source whose rows start at an odd byte
    offset and stride: one block and two blocks land byte for byte (a block's host bytes: for
    each plane, every layer's K then V page)."""
    kv = caches(dtype)
    swapper = KVSwapper(kv, 2, torch.device(TEST_DEVICE))
    width = swapper.block_bytes
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (2, width + 3), generator=g, dtype=torch.uint8).to(TEST_DEVICE)
    for rows, device_ids in ((raw[:1, 1:1 + width], [4]), (raw[:, 3:], [6, 2])):
        swapper._scatter(torch.tensor(device_ids, device=TEST_DEVICE), rows)
        for i, b in enumerate(device_ids):
            host_bytes = torch.cat([plane[:, b].reshape(-1) for plane in kv_planes(kv)])
            assert torch.equal(host_bytes.cpu(), rows[i].cpu()), (tuple(rows.shape), b)
    swapper.close()
