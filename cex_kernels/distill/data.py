"""Deterministic, shardable, resumable batches from a map-style dataset.

Epoch ``e`` visits the dataset in ``randperm(len, seed=(seed, e))`` order; global batch ``b``
is ``order[pos:pos + batch_size]`` (the last incomplete batch of an epoch is dropped) and rank
``r`` of ``world`` takes its contiguous ``batch_size / world`` slice. So ``(epoch, pos)`` is
the whole data position a resume needs, and W ranks together see exactly the batches one
process would.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch.utils.data import TensorDataset, default_collate


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class ShardedBatches:
    def __init__(self, dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world}")
        if len(dataset) < batch_size:
            raise ValueError(f"dataset has {len(dataset)} samples, fewer than one batch ({batch_size})")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.pos = 0, 0
        self._order = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.dataset), generator=g))
        return self._order[1]

    def _collate(self, idx: torch.Tensor):
        if isinstance(self.dataset, TensorDataset):
            return tuple(t[idx] for t in self.dataset.tensors)
        return default_collate([self.dataset[int(i)] for i in idx])

    def _local(self, global_idx: torch.Tensor):
        per_rank = self.batch_size // self.world
        return self._collate(global_idx[self.rank * per_rank:(self.rank + 1) * per_rank])

    def peek(self):
        """This rank's share of the first batch of epoch 0, without moving the position."""
        epoch, pos = self.epoch, self.pos
        self.epoch, self.pos = 0, 0
        batch = self._local(self._epoch_order()[:self.batch_size])
        self.epoch, self.pos = epoch, pos
        return batch

    def next(self):
        if self.pos + self.batch_size > len(self.dataset):
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._epoch_order()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self._local(idx)

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "batch_size": self.batch_size,
                "seed": self.seed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if (state["batch_size"], state["seed"]) != (self.batch_size, self.seed):
            raise ValueError(f"checkpoint data position is for batch_size={state['batch_size']}, "
                             f"seed={state['seed']}; this run has {self.batch_size}, {self.seed}")
        self.epoch, self.pos = state["epoch"], state["pos"]
