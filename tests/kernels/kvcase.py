"""Random paged-cache cases shared by the kernel tests (fresh random data every call)."""

from __future__ import annotations

import dataclasses

import torch

from tritonkv.cache.layout import token_minor_view, use_token_minor_v
from tritonkv.cache.quant_format import qmax
from tritonkv.ops.paged_attention import paged_attention_reference
from tritonkv.ops.quant import dynamic_scale, paged_attention_quant_reference, quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = DEVICE == "cpu"


@dataclasses.dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float
    max_query_len: int
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                self.query_start_loc, self.scale)


def make_case(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, page=16,
              dtype=torch.bfloat16, kv_dtype=None, scale_mode="token", device=DEVICE,
              extra_blocks=3, gen=None, v_minor=None, pad="random"):
    """Random q and cache; blocks handed out in a random order; cache slots that no sequence
    uses hold random data too. kv_dtype fp8/int8 -> cache quantised from random floats with
    per-token-head ('token') or per-block ('block') scales. ``v_minor``: V stored token-minor
    (cache/layout.py); None = as the engine allocates it for this dtype. ``pad``: the
    block-table entries past each sequence hold 'random' real ids, 'nan' the id of an unused
    block filled with NaN (-128 for int8) and NaN scales, or 'out_of_range' ids far past the
    cache (a read through them faults: an illegal address on the GPU, a crash on the CPU)."""
    g = gen or torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    num_seqs = len(seq_lens)
    blocks_per_seq = [(s + page - 1) // page for s in seq_lens]
    max_blocks = max(blocks_per_seq + [1]) + 1
    num_blocks = sum(blocks_per_seq) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.full((num_seqs, max_blocks), 0, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        bt[i, :nb] = perm[used:used + nb].int()
        # unused entries: random block ids (valid memory, wrong data) so a read past the
        # sequence would give wrong results rather than pass silently
        bt[i, nb:] = torch.randint(0, num_blocks, (max_blocks - nb,), generator=g).int()
        used += nb
    if pad == "nan":
        bt[bt_padding(blocks_per_seq, max_blocks)] = int(perm[-1])  # extra_blocks >= 1: unused
    elif pad == "out_of_range":
        bt[bt_padding(blocks_per_seq, max_blocks)] = 2**30
    elif pad != "random":
        raise ValueError(f"pad={pad!r}")
    kf = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=g)
    vf = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=g)
    k_scale = v_scale = None
    if kv_dtype is None or kv_dtype in (torch.bfloat16, torch.float16, torch.float32):
        k_cache = kf.to(kv_dtype or dtype)
        v_cache = vf.to(kv_dtype or dtype)
    else:
        # vary magnitudes per token-head so that scales matter
        kf = kf * torch.rand(num_blocks, page, num_kv_heads, 1, generator=g) * 4
        vf = vf * torch.rand(num_blocks, page, num_kv_heads, 1, generator=g) * 4
        if scale_mode == "token":
            k_scale, v_scale = dynamic_scale(kf, kv_dtype), dynamic_scale(vf, kv_dtype)
            k_cache = quantize(kf, k_scale[..., None], kv_dtype)
            v_cache = quantize(vf, v_scale[..., None], kv_dtype)
        else:
            k_scale = kf.abs().amax(dim=(1, 3)) / qmax(kv_dtype)
            v_scale = vf.abs().amax(dim=(1, 3)) / qmax(kv_dtype)
            k_cache = quantize(kf, k_scale[:, None, :, None], kv_dtype)
            v_cache = quantize(vf, v_scale[:, None, :, None], kv_dtype)
    if pad == "nan":  # perm[-1] is no sequence's block (extra_blocks >= 1)
        nan_blk = int(perm[-1])
        assert extra_blocks >= 1 and used < num_blocks
        for cache in (k_cache, v_cache):
            cache[nan_blk] = (torch.tensor(float("nan")).to(cache.dtype)
                              if cache.dtype.is_floating_point else -128)
        for sc in (k_scale, v_scale):
            if sc is not None:
                sc[nan_blk] = float("nan")
    if v_minor is None:
        v_minor = use_token_minor_v(v_cache.dtype, head_dim)
    if v_minor:
        v_cache = as_token_minor(v_cache)
    qsl = torch.zeros(num_seqs + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    q = torch.randn(int(qsl[-1]), num_heads, head_dim, generator=g).to(dtype)
    mv = lambda t: None if t is None else _to(t, device)  # noqa: E731
    return Case(mv(q), mv(k_cache), mv(v_cache), mv(bt), mv(torch.tensor(seq_lens, dtype=torch.int32)),
                mv(qsl), head_dim ** -0.5, max(q_lens + [0]), mv(k_scale), mv(v_scale))


def bt_padding(blocks_per_seq, max_blocks) -> torch.Tensor:
    """Mask of the block-table entries past each sequence's last block."""
    cols = torch.arange(max_blocks)[None, :]
    return cols >= torch.tensor(blocks_per_seq)[:, None]


def as_token_minor(cache: torch.Tensor) -> torch.Tensor:
    """The same values in token-minor storage (a permuted view of a new tensor)."""
    return token_minor_view(cache.permute(0, 2, 3, 1).contiguous())


def _to(t: torch.Tensor, device) -> torch.Tensor:
    """Move keeping the stride pattern (``.to`` of a permuted view may not)."""
    if t.dim() == 4 and t.stride(1) == 1 and t.stride(-1) != 1:
        return token_minor_view(t.permute(0, 2, 3, 1).to(device))
    return t.to(device)


def reference(c: Case, window=None, sinks=0) -> torch.Tensor:
    """The oracle for a case: the float reference, dequantising first for an 8-bit cache."""
    if c.k_scale is None:
        return paged_attention_reference(*c.args(), window, sinks)
    return paged_attention_quant_reference(*c.args(), window, sinks, k_scale=c.k_scale,
                                           v_scale=c.v_scale)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tol(dtype) -> float:
    return {torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    """A kernel's output: the reference's shape, every element written (the NaN poison gone)
    and finite, within ``tol(dtype)`` relative error."""
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    err = rel_err(out, ref)
    assert err < tol(dtype), err


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def poison_stale_slots(c):
    """NaN in every cache slot past a sequence's length inside its last page: a kernel that
    reads whole pages must mask them (0 * NaN is NaN)."""
    page = c.k_cache.shape[1]
    for i, n in enumerate(c.seq_lens.tolist()):
        if n % page:
            blk = int(c.block_tables[i, (n - 1) // page])
            for sc in (c.k_scale, c.v_scale):  # per token-head scales of the stale slots
                if sc is not None and sc.dim() == 3:
                    sc[blk, n % page:] = float("nan")
            for cache in (c.k_cache, c.v_cache):
                if cache.dtype.is_floating_point and cache.dtype.itemsize > 1:
                    cache[blk, n % page:] = float("nan")
                elif cache.dtype == torch.float8_e4m3fn:
                    cache[blk, n % page:] = torch.tensor(float("nan")).to(cache.dtype)
