"""Runs the host-tier copies of a step (cache/tier_moves.py's ``SwapPlan``): KV blocks between
the device pool and host memory, every block of a step in one batched gather / scatter.

Rules:
- The host pool holds each block's bytes contiguous: ``[host_blocks, block_bytes]`` uint8,
  where a block's bytes are, for each plane (the KV codes, then the fp8 / int8 scales), every
  layer's K then V page of that block in the device storage's own layout and dtype. A block
  that goes out and comes back is bit-identical.
- One step's copies run in this order, so a block released and handed out again in the same
  step is never read after it is written: (1) gather the outgoing device blocks into a
  device staging buffer, (2) copy the incoming host blocks (prefix loads) into a device
  staging buffer, (3) scatter them into the device pool, (3r) the same for the restores
  (swap-ins), (4) copy the outgoing staging to host. Host copies go one per run of
  consecutive host block ids (the host tier hands out runs).
- CUDA: the host pool is pinned (``cudaHostRegister``: no power-of-two rounding of a large
  pinned allocation); (1)-(3r) run on the copy stream, which first waits for the compute
  stream (earlier steps wrote the outgoing blocks); the compute stream waits for (1)-(3)
  (what this step reads and writes), for (3r) only when the plan says ``wait_restores`` (a
  restored sequence runs in this step, or its blocks were released); otherwise the scheduler
  runs restored sequences once ``restores_landed`` (cache/tier_moves.py), so (3r) and (4)
  overlap the steps between.
- (4) runs on a second stream (the out stream), after (1) filled its staging: host -> device
  and device -> host copies then share the link in both directions at once instead of
  queueing behind each other. Host rows order the two streams: a host read (2, 3r) waits for
  the device -> host copies still in flight if they write a row it reads, and (4) waits for
  the host reads queued before it (this step's included) if it writes a row they read (a
  host block freed by a restore and reused in the same step). Copies of one stream keep
  their order.
- CPU: the same code path, every copy synchronous.
- Disk tier (``kv_disk_path``): one file per server run, ``tritonkv-kv-<pid>-<n>.bin``, holding
  ``[disk_blocks, block_bytes]`` like the host pool, mapped (np.memmap); removed at close and
  at interpreter exit, and files of dead processes are removed when a tier starts. Before (1):
  (a) the incoming disk blocks are read, then (b) the spilled host blocks are written to disk
  (after the copies in flight finish: the host rows must hold their bytes), so a disk block
  or host block freed and reused in one step is read before it is written.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import re
import weakref

import numpy as np
import torch

from tritonkv.cache.tier_moves import SwapPlan

log = logging.getLogger("tritonkv.kv_swap")


def kv_planes(kv_caches) -> list[torch.Tensor]:
    """The device storage as uint8 ``[layers * 2, num_blocks, page_bytes]`` planes: the KV
    tensor, then (fp8 / int8) the scales tensor. Each layer's (k, v[, k_scale, v_scale]) must
    be views into one ``[layers, 2, num_blocks, ...]`` tensor per plane (cache/allocate.py)."""
    layers = len(kv_caches)
    planes = []
    for a in range(0, len(kv_caches[0]), 2):
        first = kv_caches[0][a]
        root = first._base if first._base is not None else first
        page = first.numel() * first.element_size()  # one layer's K (or V) of every block
        ok = root.is_contiguous() and root.numel() * root.element_size() == 2 * layers * page and all(
            kv_caches[i][a + j].data_ptr() == root.data_ptr() + (2 * i + j) * page
            for i in range(layers) for j in (0, 1))
        if not ok:
            raise ValueError("the host tier needs the KV caches as views into one [layers, 2, blocks, ...] "
                             "storage tensor per plane (cache/allocate.py)")
        planes.append(root.reshape(-1).view(torch.uint8).view(2 * layers, first.shape[0], -1))
    return planes


def _as_words(planes: list[torch.Tensor]) -> list[torch.Tensor]:
    """``planes`` viewed as the widest integer word that divides every plane's page: the
    gathers and scatters then move 8-byte elements, not bytes (same bytes, same layout)."""
    for word in (torch.int64, torch.int32, torch.int16):
        size = word.itemsize
        if all(p.shape[2] % size == 0 and p.data_ptr() % size == 0 for p in planes):
            return [p.view(word) for p in planes]
    return planes


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(offset in ``ids``, first id, length) of each run of consecutive ids."""
    runs, i = [], 0
    while i < len(ids):
        j = i + 1
        while j < len(ids) and ids[j] == ids[j - 1] + 1:
            j += 1
        runs.append((i, ids[i], j - i))
        i = j
    return runs


_DISK_FILE = re.compile(r"tritonkv-kv-(\d+)-\d+\.bin$")
_disk_files = itertools.count()


def remove_stale_disk_files(directory: str) -> list[str]:
    """Remove disk-tier files whose process is gone (a killed server's); returns their names."""
    removed = []
    for name in os.listdir(directory):
        m = _DISK_FILE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    return removed


class DiskBlocks:
    """``[num_blocks, block_bytes]`` uint8 in a file of this process under ``directory``."""

    def __init__(self, directory: str, num_blocks: int, block_bytes: int):
        if not os.path.isdir(directory):
            raise ValueError(f"parameter 'kv_disk_path' = {directory!r}: not a directory")
        remove_stale_disk_files(directory)
        self.path = os.path.join(directory, f"tritonkv-kv-{os.getpid()}-{next(_disk_files)}.bin")
        with open(self.path, "wb") as f:
            f.truncate(num_blocks * block_bytes)
        self.array = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(num_blocks, block_bytes))
        atexit.register(self.close)

    def close(self) -> None:
        if self.array is not None:
            self.array = None
            if os.path.exists(self.path):
                os.unlink(self.path)


def pin(owner, host: torch.Tensor):
    """Page-lock ``host`` for asynchronous copies; the returned finalizer unpins it, and runs
    by itself when ``owner`` is collected. Rule: a registration never outlives its buffer
    (an engine dropped without close() would otherwise leave its freed address registered,
    and the next tier allocated there fails with cudaErrorHostMemoryAlreadyRegistered)."""
    cudart, ptr = torch.cuda.cudart(), host.data_ptr()
    rc = cudart.cudaHostRegister(ptr, host.numel(), 0)
    if int(rc) != 0:
        raise RuntimeError(f"cudaHostRegister of {host.numel() / 2**30:.1f} GiB for the host KV "
                           f"tier failed (error {int(rc)}); lower kv_host_memory_gb")
    # the finalizer holds the buffer: it is freed only after it is unregistered
    return weakref.finalize(owner, _unregister, cudart, ptr, host)


def _unregister(cudart, ptr: int, host: torch.Tensor) -> None:
    cudart.cudaHostUnregister(ptr)


class KVSwapper:
    def __init__(self, kv_caches, num_host_blocks: int, device: torch.device, disk: DiskBlocks | None = None):
        self.planes = _as_words(kv_planes(kv_caches))
        self.device = device
        self.widths = [p.shape[0] * p.shape[2] * p.element_size() for p in self.planes]  # bytes
        self.block_bytes = sum(self.widths)
        self.cuda = device.type == "cuda"
        self.host = torch.empty((num_host_blocks, self.block_bytes), dtype=torch.uint8)
        self._unpin = None
        self.stream = self.out_stream = None
        if self.cuda:
            self._unpin = pin(self, self.host)
            self.stream = torch.cuda.Stream(device)  # (1)-(3r): reads host rows
            self.out_stream = torch.cuda.Stream(device)  # (4): writes host rows
        # CUDA: the host rows that copies still in flight may read / write, with an event
        # recorded after the last of them (rows of copies known finished are forgotten)
        self._reads: tuple = (None, set())
        self._writes: tuple = (None, set())
        self.disk = disk
        self.bytes_out = 0
        self.bytes_in = 0
        self._restored = None  # CUDA: an event after the last queued restore (3r)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.int64)
        return t.pin_memory().to(self.device, non_blocking=True) if self.cuda else t

    def _gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Device blocks ``ids`` as ``[n, block_bytes]``: one index_select per plane, straight
        into block-major order (a plane seen as ``[blocks, layers * 2, page]``)."""
        n = ids.numel()
        parts = [p.transpose(0, 1).index_select(0, ids).view(torch.uint8).reshape(n, -1) for p in self.planes]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _scatter(self, ids: torch.Tensor, src: torch.Tensor) -> None:
        n, col = ids.numel(), 0
        for p, w in zip(self.planes, self.widths):
            part = src[:, col:col + w]
            size = p.element_size()
            if part.storage_offset() % size or part.stride(0) % size:  # not viewable as words
                part = part.clone(memory_format=torch.contiguous_format)
            part = part.view(p.dtype)
            p.transpose(0, 1).index_copy_(0, ids, part.reshape(n, p.shape[0], p.shape[2]))
            col += w

    def run(self, plan: SwapPlan) -> None:
        """Queue (CUDA) or run (CPU) the step's copies; the compute stream then sees the
        device pool as the plan leaves it."""
        if not plan:
            return
        loaded = self._disk_moves(plan) if plan.in_disk or plan.spill_host else None
        if not self.cuda:
            return self._copies(plan, loaded)
        compute = torch.cuda.current_stream(self.device)
        if plan.copies_device():
            self.stream.wait_stream(compute)
            with torch.cuda.stream(self.stream):
                device_done = self._copies(plan, loaded)
            compute.wait_event(device_done)
        if plan.wait_restores and self._restored is not None:
            compute.wait_event(self._restored)

    def restores_landed(self) -> bool:
        """Every queued restore (3r) is in the device pool (CPU: they ran synchronously)."""
        return self._restored is None or self._restored.query()

    def wait_restores(self) -> None:
        """Block this thread until the queued restores landed."""
        if self._restored is not None:
            self._restored.synchronize()

    def _disk_moves(self, plan: SwapPlan) -> torch.Tensor | None:
        """(a) read the incoming disk blocks, (b) spill host blocks to disk."""
        loaded = None
        if plan.in_disk:
            loaded = torch.from_numpy(np.ascontiguousarray(self.disk.array[plan.in_disk]))
            if self.cuda:
                loaded = loaded.pin_memory()
        if plan.spill_host:
            self.synchronize()  # earlier device-to-host copies into these rows have landed
            self.disk.array[plan.spill_disk] = self.host[plan.spill_host].numpy()
        return loaded

    def _copies(self, plan: SwapPlan, loaded: torch.Tensor | None = None):
        out = self._gather(self._ids(plan.out_device)) if plan.out_device else None  # (1)
        gathered, reads = None, plan.in_host + plan.restore_host
        if self.cuda:
            if out is not None:
                gathered = torch.cuda.Event()
                gathered.record(self.stream)
            self._after_writes(plan.in_host)
        if plan.in_host:  # (2), (3)
            self._load(plan.in_host, plan.in_device)
        if loaded is not None:  # disk blocks, read in (a)
            self._scatter(self._ids(plan.in_disk_device), loaded.to(self.device, non_blocking=True))
            self.bytes_in += loaded.numel()
        device_done = None
        if self.cuda:
            device_done = torch.cuda.Event()
            device_done.record(self.stream)
        if plan.restore_host:  # (3r)
            if self.cuda:  # (after device_done: the step's compute waits for this only if it must)
                self._after_writes(plan.restore_host)
            self._load(plan.restore_host, plan.restore_device)
            if self.cuda:
                self._restored = torch.cuda.Event()
                self._restored.record(self.stream)
        if self.cuda and reads:
            self._reads = self._track(self._reads, reads, self.stream)
        if out is not None:
            if self.cuda:  # (4) on the out stream, once (1) filled ``out``
                self.out_stream.wait_event(gathered)
                if not self._in_flight(self._reads).isdisjoint(plan.out_host):
                    self.out_stream.wait_event(self._reads[0])  # rows a queued read still needs
                out.record_stream(self.out_stream)
                with torch.cuda.stream(self.out_stream):
                    self._store(out, plan.out_host)
                self._writes = self._track(self._writes, plan.out_host, self.out_stream)
            else:
                self._store(out, plan.out_host)
            self.bytes_out += out.numel()
        return device_done

    def _store(self, out: torch.Tensor, host_ids: list[int]) -> None:
        """(4): the gathered blocks -> their host rows, one copy per run of rows."""
        for at, first, n in _runs(host_ids):
            self.host[first:first + n].copy_(out[at:at + n], non_blocking=True)

    def _after_writes(self, rows: list[int]) -> None:
        """The copy stream's next copies wait for the device -> host copies in flight if
        they write one of ``rows``."""
        if rows and not self._in_flight(self._writes).isdisjoint(rows):
            self.stream.wait_event(self._writes[0])

    @staticmethod
    def _in_flight(tracked: tuple) -> set:
        """The rows of ``tracked`` (event, rows) whose copies may still run (none once its event
        has completed)."""
        event, rows = tracked
        if event is not None and rows and event.query():
            rows.clear()
        return rows

    def _track(self, tracked: tuple, rows: list[int], stream) -> tuple:
        """``tracked`` plus ``rows``, whose copies were just queued on ``stream``."""
        pending = self._in_flight(tracked)
        pending.update(rows)
        event = torch.cuda.Event()
        event.record(stream)
        return event, pending

    def _load(self, host_ids: list[int], device_ids: list[int]) -> None:
        """Host blocks -> a device staging buffer -> the device pool."""
        staging = torch.empty((len(host_ids), self.block_bytes), dtype=torch.uint8, device=self.device)
        for at, first, n in _runs(host_ids):
            staging[at:at + n].copy_(self.host[first:first + n], non_blocking=True)
        self._scatter(self._ids(device_ids), staging)
        self.bytes_in += staging.numel()

    def synchronize(self) -> None:
        """Wait for every copy queued on either stream."""
        if self.stream is not None:
            self.stream.synchronize()
            self.out_stream.synchronize()

    def close(self) -> None:
        """Wait for the copies in flight, unpin the host pool, remove the disk file."""
        self.synchronize()
        if self.disk is not None:
            self.disk.close()
        if self._unpin is not None:
            self._unpin()


def run_swaps(kv, swapper: KVSwapper | None) -> None:
    """Run the copies the KV manager queued (swaps, demotions, prefix loads) before anything
    else touches the device pool this step."""
    swaps = kv.take_swaps()
    if swaps:
        swapper.run(swaps)


def settle_restores(kv, swapper: KVSwapper | None, block: bool = False) -> None:
    """Before a step is planned: restores that landed make their sequences schedulable
    (``block``: wait for them first, when nothing else can run)."""
    if swapper is None or not kv.restoring_any():
        return
    if block:
        swapper.wait_restores()
    if swapper.restores_landed():
        kv.restores_landed()


def close_swapper(swapper: KVSwapper | None) -> None:
    if swapper is not None:
        swapper.close()


def build_host_tier(config, kv_caches, device: torch.device, device_blocks: int):
    """(HostTier, disk HostTier or None, KVSwapper) sized by ``host_tier_bytes`` and
    ``kv_disk_gb`` (``config``: the EngineConfig), or (None, None, None) when the host tier is
    off or holds no whole block."""
    from tritonkv.cache.host_tier import HostTier, host_tier_bytes

    kv_host_memory_gb, kv_disk_path, kv_disk_gb = config.kv_host_memory_gb, config.kv_disk_path, config.kv_disk_gb

    block_bytes = sum(p.shape[0] * p.shape[2] for p in kv_planes(kv_caches))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    num = host_tier_bytes(kv_host_memory_gb, device.type == "cuda", gpus, device_blocks * block_bytes) // block_bytes
    if num <= 0:
        if kv_disk_gb > 0:
            raise ValueError(f"parameter 'kv_disk_gb' = {kv_disk_gb}: the disk tier takes what the host tier "
                             "drops; set kv_host_memory_gb > 0 too")
        return None, None, None
    disk_num = int(kv_disk_gb * 2**30) // block_bytes
    disk = DiskBlocks(kv_disk_path, disk_num, block_bytes) if disk_num > 0 else None
    swapper = KVSwapper(kv_caches, num, device, disk)
    log.info("KV host tier: %d blocks (%.2f GiB%s)%s", num, num * block_bytes / 2**30,
             ", pinned" if device.type == "cuda" else "",
             f"; disk tier: {disk_num} blocks in {disk.path}" if disk else "")
    return HostTier(num, block_bytes), (HostTier(disk_num, block_bytes) if disk else None), swapper


def tier_stats(kv, swapper: KVSwapper | None, scheduler) -> dict[str, int]:
    """Engine.stats() entries of the host tier (zeros when it is off): its blocks (used by
    parked conversations, cached prefix blocks, free), the sequences parked there, blocks and
    bytes copied each way (demotions and prefix loads included), what it dropped, prefix
    blocks demoted to it and prefix blocks loaded from it (host-tier prefix hits)."""
    c = kv.tier_counts()
    return {"host_blocks_total": c.get("total", 0), "host_blocks_used": c.get("used", 0),
            "host_blocks_free": c.get("free", 0), "host_sequences": c.get("sequences", 0),
            "swap_out_blocks": c.get("swap_out_blocks", 0), "swap_in_blocks": c.get("swap_in_blocks", 0),
            "swap_in_device_hit_blocks": c.get("swap_in_device_hit_blocks", 0),
            "swap_out_bytes": swapper.bytes_out if swapper else 0, "swap_in_bytes": swapper.bytes_in if swapper else 0,
            "swap_outs": scheduler.num_swap_outs, "swap_ins": c.get("swap_ins", 0),
            "host_dropped_blocks": c.get("dropped_blocks", 0), "host_blocks_cached": c.get("cached", 0),
            "demoted_blocks": c.get("demoted_blocks", 0), "host_prefix_hit_blocks": c.get("prefix_hit_blocks", 0),
            "disk_blocks_total": c.get("disk_total", 0), "disk_blocks_used": c.get("disk_used", 0),
            "disk_sequences": c.get("disk_sequences", 0), "spill_blocks": c.get("disk_swap_out_blocks", 0),
            "disk_swap_in_blocks": c.get("disk_swap_in_blocks", 0)}
