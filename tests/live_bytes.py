"""Peak bytes of the tensors that torch ops make while Python holds them (a dispatch mode): for
memory checks of code that runs without autograd keeping tensors of its own (e.g. inside an
autograd Function's forward). Views count once, with their storage."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, Python tensors on it]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live:
                    self.live[key] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.live[key][1] += 1
                weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int):
        entry = self.live[key]
        entry[1] -= 1
        if not entry[1]:
            del self.live[key]
            self.now -= entry[0]
