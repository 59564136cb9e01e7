"""Deterministic, shardable, resumable batches from a map-style or streaming dataset, and the
default collator for Hugging Face-style rows.

Map-style: epoch ``e`` visits the dataset in ``randperm(len, seed=(seed, e))`` order; global
batch ``b`` is ``order[pos:pos + batch_size]`` (the last incomplete batch of an epoch is
dropped) and rank ``r`` of ``world`` takes its contiguous ``batch_size / world`` slice. So
``(epoch, pos)`` is the whole data position a resume needs, and W ranks together see exactly
the batches one process would.

Streaming (``torch.utils.data.IterableDataset``, e.g. ``datasets`` with ``streaming=True``):
rows are taken in the stream's order, ``batch_size`` at a time (each rank reads the stream and
keeps its slice); when it ends, the next epoch starts it again (``set_epoch(e)`` is called
when the dataset has it). A resume skips the batches already consumed. With ``num_workers >
0`` the iterable must split its rows over workers itself, as PyTorch documents (``datasets``
does).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, default_collate

from cex_kernels.distill.batch import IGNORE_INDEX


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _numeric(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_numeric(v) for v in value)
    try:
        import numpy as np
        return isinstance(value, np.ndarray) and value.dtype.kind in "biuf"
    except ImportError:
        return False


def forward_inputs(*models) -> Optional[set]:
    """Names every model's ``forward`` takes (their intersection), or None when a forward
    takes only ``*args``/``**kwargs`` (then no column is dropped by name)."""
    keep = None
    for model in models:
        params = inspect.signature(model.forward).parameters.values()
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not names:
            return None
        keep = names if keep is None else keep & names
    return keep


class PadCollator:
    """Collates rows that are dicts of Python lists / 1-D tensors of different lengths (the
    ``datasets`` format), Hugging Face ``DataCollatorWithPadding`` style:

    - drops columns that are not numeric (``"text"``) and, when ``columns`` is given, the
      ones not in it (``"labels"`` is always kept);
    - pads each sequence column to the longest in the batch (on the right): ``input_ids``
      with ``pad_token_id``, ``labels`` with -100, the rest with 0;
    - adds ``attention_mask`` (1 = real token) when the rows have none;
    - with ``causal_lm`` and no ``labels`` column: ``labels = input_ids`` with -100 on
      padding (the model shifts them; see :func:`cex_kernels.distill.batch.aligned_labels`).

    Rows that are not dicts go to ``torch.utils.data.default_collate``.
    """

    def __init__(self, pad_token_id: int = 0, *, columns: Optional[Iterable[str]] = None,
                 causal_lm: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.columns = None if columns is None else set(columns) | {"labels"}
        self.causal_lm = causal_lm

    def _pad_value(self, key: str):
        return {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)

    def __call__(self, rows: Sequence[Any]):
        if not isinstance(rows[0], dict):
            return default_collate(list(rows))
        out, lengths = {}, None
        for key in rows[0]:
            if self.columns is not None and key not in self.columns:
                continue
            values = [r[key] for r in rows]
            if not all(_numeric(v) for v in values):
                continue
            tensors = [torch.as_tensor(v) for v in values]
            if all(t.shape == tensors[0].shape for t in tensors):
                out[key] = torch.stack(tensors)
                if tensors[0].dim() == 1 and key == "input_ids":
                    lengths = [len(t) for t in tensors]
                continue
            if any(t.dim() != 1 for t in tensors):
                raise ValueError(f"collate: column {key!r} has rows of shapes "
                                 f"{sorted({tuple(t.shape) for t in tensors})}; only 1-D "
                                 "sequences are padded")
            longest = max(len(t) for t in tensors)
            padded = tensors[0].new_full((len(tensors), longest), self._pad_value(key))
            for i, t in enumerate(tensors):
                padded[i, :len(t)] = t
            out[key] = padded
            if key == "input_ids":
                lengths = [len(t) for t in tensors]
        if "input_ids" in out and "attention_mask" not in out and lengths is not None:
            ids = out["input_ids"]
            out["attention_mask"] = (torch.arange(ids.shape[1])[None, :] <
                                     torch.tensor(lengths)[:, None]).long()
        if self.causal_lm and "labels" not in out and "input_ids" in out:
            mask = out.get("attention_mask")
            labels = out["input_ids"].clone()
            out["labels"] = labels if mask is None else labels.masked_fill(mask == 0, IGNORE_INDEX)
        return out


class _Iterable(IterableDataset):
    """Any re-iterable object as a torch ``IterableDataset``."""

    def __init__(self, source):
        self.source = source

    def __iter__(self):
        return iter(self.source)


def _rows(batch):
    return batch  # a DataLoader collate_fn that keeps the list of rows


class ShardedBatches:
    """Map-style datasets (``len`` and ``__getitem__``); see the module docstring."""

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 collate_fn=None, num_workers: int = 0):
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world}")
        if len(dataset) < batch_size:
            raise ValueError(f"dataset has {len(dataset)} samples, fewer than one batch ({batch_size})")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world
        self.collate_fn = collate_fn or PadCollator()
        self.num_workers = num_workers
        self.epoch, self.pos = 0, 0
        self._order = None
        self._loader = None  # (epoch, pos it started at, iterator) with workers

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.dataset), generator=g))
        return self._order[1]

    def _local_idx(self, global_idx: torch.Tensor):
        per_rank = self.batch_size // self.world
        return global_idx[self.rank * per_rank:(self.rank + 1) * per_rank]

    def _collate(self, idx: torch.Tensor):
        if isinstance(self.dataset, TensorDataset):
            return tuple(t[idx] for t in self.dataset.tensors)
        return self.collate_fn([self.dataset[int(i)] for i in idx])

    def peek(self):
        """This rank's share of the first batch of epoch 0, without moving the position."""
        epoch, pos = self.epoch, self.pos
        self.epoch, self.pos = 0, 0
        batch = self._collate(self._local_idx(self._epoch_order()[:self.batch_size]))
        self.epoch, self.pos = epoch, pos
        return batch

    def _worker_batches(self):
        order, n = self._epoch_order(), len(self.dataset) // self.batch_size * self.batch_size
        batches = [self._local_idx(order[p:p + self.batch_size]).tolist()
                   for p in range(self.pos, n, self.batch_size)]
        loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate_fn,
                            num_workers=self.num_workers)
        return iter(loader)

    def next(self):
        if self.pos + self.batch_size > len(self.dataset):
            self.epoch, self.pos, self._loader = self.epoch + 1, 0, None
        if self.num_workers and not isinstance(self.dataset, TensorDataset):
            if self._loader is None:
                self._loader = self._worker_batches()
            self.pos += self.batch_size
            return next(self._loader)
        idx = self._epoch_order()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self._collate(self._local_idx(idx))

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "batch_size": self.batch_size,
                "seed": self.seed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if (state["batch_size"], state["seed"]) != (self.batch_size, self.seed):
            raise ValueError(f"checkpoint data position is for batch_size={state['batch_size']}, "
                             f"seed={state['seed']}; this run has {self.batch_size}, {self.seed}")
        self.epoch, self.pos, self._loader = state["epoch"], state["pos"], None


class StreamingBatches:
    """``IterableDataset``s (no ``len``); see the module docstring."""

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 collate_fn=None, num_workers: int = 0):
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world
        self.collate_fn = collate_fn or PadCollator()
        self.num_workers = num_workers
        self.epoch, self.pos = 0, 0  # pos: global batches consumed in this epoch
        self._it = None

    def _open(self, epoch: int, skip: int):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        dataset = self.dataset if isinstance(self.dataset, IterableDataset) else \
            _Iterable(self.dataset)
        it = iter(DataLoader(dataset, batch_size=self.batch_size, collate_fn=_rows,
                             num_workers=self.num_workers, drop_last=True))
        for _ in range(skip):
            next(it)
        return it

    def _local(self, rows):
        per_rank = self.batch_size // self.world
        return self.collate_fn(rows[self.rank * per_rank:(self.rank + 1) * per_rank])

    def peek(self):
        try:
            return self._local(next(self._open(0, 0)))
        except StopIteration:
            raise ValueError(f"the streaming dataset has fewer rows than one batch "
                             f"({self.batch_size})") from None

    def next(self):
        if self._it is None:
            self._it = self._open(self.epoch, self.pos)
        try:
            rows = next(self._it)
        except StopIteration:
            self.epoch, self.pos = self.epoch + 1, 0
            self._it = self._open(self.epoch, 0)
            rows = next(self._it)
        self.pos += 1
        return self._local(rows)

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "batch_size": self.batch_size,
                "seed": self.seed, "streaming": True}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["batch_size"] != self.batch_size or not state.get("streaming"):
            raise ValueError(f"checkpoint data position is for batch_size={state['batch_size']}"
                             f" (streaming={bool(state.get('streaming'))}); this run streams "
                             f"with batch_size={self.batch_size}")
        self.epoch, self.pos, self._it = state["epoch"], state["pos"], None


def make_batches(dataset, batch_size: int, **kwargs):
    """:class:`StreamingBatches` for an ``IterableDataset`` (or anything without ``len``),
    else :class:`ShardedBatches`."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return StreamingBatches(dataset, batch_size, **kwargs)
    return ShardedBatches(dataset, batch_size, **kwargs)
