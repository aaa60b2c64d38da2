"""Reused CPU buffers for the Mogrifier fast path: a workspace of flat buffers, carved into aligned views."""
from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class Workspace:
    """Reuses the big per-call buffers on the CPU.

    Each call needs tens of MB of buffers (forward: kept for the backward; backward: scratch). Fresh
    memory of that size comes from the OS page by page (page faults: ~10% of the layer's time at
    B=32, n=256). The workspace keeps the flat buffers it hands out and gives one out again when nothing
    but the workspace references its storage any more (the autograd graph released its saved tensors,
    or the backward finished). CUDA has its own caching allocator, so it is used on the CPU only.
    `release_workspace()` drops the free buffers.
    """

    max_free = 6

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: dict[tuple, list[Tensor]] = {}

    @staticmethod
    def _free(buffer: Tensor) -> bool:
        return _storage_use_count(buffer.untyped_storage()._cdata) <= 2  # the workspace + this call

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if device.type != "cpu" or _storage_use_count is None:
            return torch.empty(numel, dtype=dtype, device=device)
        with self._lock:
            buffers = self._buffers.setdefault((device, dtype), [])
            free = [b for b in buffers if self._free(b)]
            fits = [b for b in free if b.numel() >= numel]
            if fits:
                return min(fits, key=Tensor.numel)[:numel]
            # A new buffer; free ones too small for this request go, and at most max_free stay free.
            free.sort(key=Tensor.numel)
            drop = {id(b) for b in free if b.numel() < numel} | {id(b) for b in free[: -self.max_free]}
            buffers[:] = [b for b in buffers if id(b) not in drop]
            buffer = torch.empty(numel, dtype=dtype, device=device)
            buffers.append(buffer)
            return buffer[:numel]

    def release(self) -> None:
        with self._lock:
            for buffers in self._buffers.values():
                buffers[:] = [b for b in buffers if not self._free(b)]


WORKSPACE = Workspace()


def release_workspace() -> None:
    """Give the free buffers of the fast path's CPU workspace back to the allocator."""
    WORKSPACE.release()


class Carve:
    """Consecutive views [shape] of one flat buffer, each starting 64-byte aligned."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device):
        self.sizes = [math.prod(shape) for shape in shapes]
        self.flat = WORKSPACE.take(sum(-(-k // 16) * 16 for k in self.sizes), dtype, device)
        self.offset = 0

    def __call__(self, *shape: int) -> Tensor:
        numel = math.prod(shape)
        view = self.flat[self.offset : self.offset + numel].view(shape)
        self.offset += -(-numel // 16) * 16
        return view
