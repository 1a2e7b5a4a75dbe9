"""A memory probe for the tests (no T x T buffer) and the loss benchmark (peak extra memory): test code, not part of
the installed package."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AllocationProbe(TorchDispatchMode):
    """Memory probe for CPU code: the largest tensor any op creates (``largest_numel``) and the peak of bytes held
    at once by the tensor storages created inside the probe (``peak``; inputs excluded). Used by the tests (no
    T x T buffer) and the benchmarks (peak extra memory), where torch.cuda's allocator statistics do not exist."""

    def __init__(self):
        super().__init__()
        self.largest_numel = self.live = self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest_numel = max(self.largest_numel, tensor.numel())
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._alive:
                    self._alive.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(tensor, self._release, key, storage.nbytes())  # when the last view dies
        return out

    def _release(self, key: int, nbytes: int) -> None:
        if key in self._alive:
            self._alive.discard(key)
            self.live -= nbytes
