"""Device memory shared by every instance on a device: the KV cache tensor (with the scales of
an fp8 / int8 cache) and model weights.

Both are companions of a ``SharedBlockPool`` (same name, same lifetime: made by the process
that creates the pool, attached by the others, removed by the last one out). Call the
functions here from the pool's ``on_open`` hook, i.e. under the pool lock, so an attacher
never sees a half-made companion.

Rule: an fp8 / int8 pool shares its per token-head scales (``kv_scales``, beside ``kv``) the
same way as its codes, so every instance reads the same quantised blocks and a prefix hit
from another instance dequantises to exactly the values its writer stored.

- CPU: a file in the pool's shared-memory directory, mapped MAP_SHARED (``torch.from_file``);
  pages are committed up front (``posix_fallocate``) so a full /dev/shm fails at load, not
  with SIGBUS mid-request.
- CUDA: one device allocation made by the creating process and exported with CUDA IPC
  (torch's ``reduce_tensor``; the handle is pickled to ``tritonkv-<name>.<suffix>_cudaipc``).
  Lifetime rule: the exporting (first) instance must outlive the importers; if it dies, the
  other instances of that device must be restarted (the pool's metadata stays consistent,
  but the KV and weight memory it exported is gone).
"""

from __future__ import annotations

import atexit
import os
import pickle
from dataclasses import dataclass

import torch

from tritonkv.cache.allocate import kv_scales_shape, kv_storage_shape
from tritonkv.cache.quant_format import is_quantized
from tritonkv.cache.pool_file import reserve
from tritonkv.cache.shared_pool import SharedBlockPool
from tritonkv.model.checkpoint import load_model
from tritonkv.model.model_config import ModelConfig
from tritonkv.model.onnx_files import weight_files

WEIGHT_ALIGN_BYTES = 64


def shared_tensor(pool: SharedBlockPool, suffix: str, numel: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """A flat ``numel`` tensor shared under ``pool``; zeros when this process made the pool."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu":
        path = pool.companion_path(suffix)
        if pool.created:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # private even when an older file of another mode is reused
                reserve(fd, nbytes, path)
            finally:
                os.close(fd)
        elif not os.path.exists(path) or os.path.getsize(path) != nbytes:
            raise RuntimeError(f"KV pool {pool.name!r}: {path} is missing or not {nbytes} bytes; "
                               "the pool's creator did not finish — restart the instances")
        return torch.from_file(path, shared=True, size=numel, dtype=dtype)
    if device.type == "cuda":
        return _cuda_ipc_tensor(pool, suffix, numel, dtype, device)
    raise ValueError(f"no shared storage for device {device}")


def _cuda_ipc_tensor(pool, suffix, numel, dtype, device) -> torch.Tensor:
    from torch.multiprocessing.reductions import reduce_tensor

    path = pool.companion_path(suffix + "_cudaipc")
    if pool.created:
        t = torch.zeros(numel, dtype=dtype, device=device)
        rebuild, args = reduce_tensor(t)
        tmp = path + ".tmp"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # the handle maps this device memory: private to this user
            pickle.dump({"exporter_pid": os.getpid(), "rebuild": rebuild, "args": args}, f)
        os.replace(tmp, path)
        return t
    try:
        with open(path, "rb") as f:
            handle = pickle.load(f)
    except FileNotFoundError:
        raise RuntimeError(f"KV pool {pool.name!r}: no CUDA IPC handle at {path}; the pool's creator "
                           "did not finish — restart the instances") from None
    t = handle["rebuild"](*handle["args"])
    if t.numel() != numel or t.dtype != dtype:
        raise RuntimeError(f"KV pool {pool.name!r}: shared {suffix} has {t.numel()} x {t.dtype}, "
                           f"expected {numel} x {dtype}")
    return t


def share_weights(pool: SharedBlockPool, model: torch.nn.Module, device: torch.device) -> bool:
    """Point every parameter of ``model`` (loaded privately, on any device) at one shared
    copy: the creator fills it, attachers drop their private copy. Tied parameters stay tied.
    Returns False (nothing shared) when parameters mix dtypes."""
    params = list(model.parameters())  # unique Parameters: a tied weight appears once
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        return False
    dtype = dtypes.pop()
    align = WEIGHT_ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() // align) * align
    flat = shared_tensor(pool, "weights", total, dtype, device)
    with torch.no_grad():
        for p, off in zip(params, offsets):
            view = flat[off:off + p.numel()].view(p.shape)
            if pool.created:
                view.copy_(p.data)
            p.data = view
    return True


@dataclass
class SharedDeviceState:
    pool: SharedBlockPool
    kv_storage: torch.Tensor
    weights_shared: bool
    kv_scales: torch.Tensor | None = None  # ``kv_scales_shape`` float32 of an fp8 / int8 pool

    def close(self) -> None:
        self.pool.close()


def pool_description(checkpoint: str, model_config: ModelConfig, dtype: torch.dtype, device: torch.device,
                     kv_shape: tuple, kv_dtype: torch.dtype | None = None) -> str:
    """What the blocks (and weights) hold; attachers must agree on every part of it."""
    files = weight_files(checkpoint)  # safetensors, or an ONNX graph and its external data
    stamp = ",".join(f"{os.path.basename(f)}:{os.path.getsize(f)}:{int(os.path.getmtime(f))}" for f in files)
    return (f"checkpoint={os.path.abspath(checkpoint)} [{stamp}] layers={model_config.num_layers} "
            f"kv_heads={model_config.num_kv_heads} head_dim={model_config.head_dim} dtype={str(dtype).replace('torch.', '')} "
            f"kv_dtype={str(kv_dtype or dtype).replace('torch.', '')} device={device} kv={list(kv_shape)}")


def open_shared_device_state(name: str, checkpoint: str, model_config: ModelConfig, model: torch.nn.Module | None,
                             device: torch.device, dtype: torch.dtype, num_blocks: int, block_size: int,
                             kv_dtype: torch.dtype | None = None, **pool_kwargs) -> SharedDeviceState:
    """Create or attach the pool ``name``, its KV storage (``kv_dtype``, default ``dtype``; the
    scales too when it is fp8 / int8) and (when ``model`` is given) the model's shared weights.
    ``model`` may sit on the CPU; its parameters end up on ``device``."""
    kv_dtype = kv_dtype or dtype
    kv_shape = kv_storage_shape(model_config, num_blocks, block_size)
    scales_shape = kv_scales_shape(model_config, num_blocks, block_size) if is_quantized(kv_dtype) else None
    made = {}

    def on_open(pool: SharedBlockPool) -> None:
        made["kv"] = shared_tensor(pool, "kv", _numel(kv_shape), kv_dtype, device).view(kv_shape)
        if scales_shape is not None:
            made["scales"] = shared_tensor(pool, "kv_scales", _numel(scales_shape), torch.float32,
                                           device).view(scales_shape)
        made["weights"] = model is not None and share_weights(pool, model, device)

    description = pool_description(checkpoint, model_config, dtype, device, kv_shape, kv_dtype)
    pool = SharedBlockPool.open(name, num_blocks, block_size, description=description, on_open=on_open,
                                **pool_kwargs)
    atexit.register(pool.close)
    return SharedDeviceState(pool, made["kv"], made["weights"], made.get("scales"))


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def load_shared_model(checkpoint: str, device: torch.device, dtype: torch.dtype):
    """Load on the CPU (private, transient); ``open_shared_device_state`` then moves the
    parameters into the shared copy on ``device``; call ``.to(device)`` after for buffers."""
    return load_model(checkpoint, torch.device("cpu"), dtype)
