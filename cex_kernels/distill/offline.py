"""Offline distillation: run the teacher once (:func:`cache_teacher`, in
:mod:`~cex_kernels.distill.cache_write`), then train from the cache with no teacher in
memory (pass a :class:`~cex_kernels.distill.cache.TeacherCache`, or its directory, as the
method's ``teacher``).

Training: the trainer wraps the dataset in :class:`CachedRows` (each row with its index)
and the collator in :class:`CacheCollator`, which reads those rows from the cache and lays
their stored tokens out on the batch's padded grid under ``batch["teacher_cache"]`` (for
tuple batches: a last element ``{"teacher_cache": ...}``). The method's forward never
sees it (:func:`strip_cached`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from cex_kernels.distill import batch as B
from cex_kernels.distill import cache as C
from cex_kernels.distill.cache_write import cache_teacher  # noqa: F401 (re-exported)

CACHE_KEY = "teacher_cache"


# -- batches that carry cached targets ----------------------------------------------------
def split_cached(batch):
    """``(batch without the cached targets, targets or None)``."""
    if isinstance(batch, dict) and CACHE_KEY in batch:
        rest = {k: v for k, v in batch.items() if k != CACHE_KEY}
        return rest, batch[CACHE_KEY]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[-1], dict) \
            and CACHE_KEY in batch[-1]:
        rest = list(batch[:-1])
        if len(rest) == 2 and rest[1] is None:  # the placeholder label slot (see attach)
            rest = rest[:1]
        return type(batch)(rest) if isinstance(batch, tuple) else rest, batch[-1][CACHE_KEY]
    return batch, None


def strip_cached(batch):
    return split_cached(batch)[0]


def _attach(batch, targets):
    if isinstance(batch, dict):
        return {**batch, CACHE_KEY: targets}
    items = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    if len(items) == 1:  # keep batch[1] a label slot (None) for tuple batches without labels
        items.append(None)
    return tuple(items) + ({CACHE_KEY: targets},)


class CachedRows(torch.utils.data.Dataset):
    """``dataset`` with each row's index: ``(i, row)``."""

    def __init__(self, dataset, cache: C.TeacherCache):
        if not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
            raise TypeError("training from a teacher cache needs a map-style dataset (len and "
                            "__getitem__): the cache is keyed by row index")
        if len(dataset) != cache.num_rows:
            raise C.CacheError(f"teacher cache {cache.path!r} holds {cache.num_rows} rows, the "
                               f"dataset has {len(dataset)}: cache the same dataset")
        self.dataset, self.cache = dataset, cache

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


def _place(rows: List[Tensor], mask: Optional[Tensor], spec: Dict[str, Any], fill, stream: str,
           index: List[int]) -> Tensor:
    """Per-row stored tokens ``(n_i, ...)`` laid out as ``(B, S, ...)`` (masked) or
    ``(B, *row_shape, ...)``; a row whose token count differs from the batch's is an error."""
    tail = tuple(rows[0].shape[1:])
    if spec["masked"]:
        if mask is None:
            raise C.CacheError(f"cache stream {stream!r} was written from batches with an "
                               "attention_mask, this batch has none")
        out = rows[0].new_full((*mask.shape, *tail), fill)
        for b, (row, m) in enumerate(zip(rows, mask)):
            if int(m.sum()) != row.shape[0]:
                raise C.CacheError(f"dataset row {index[b]}: {int(m.sum())} real tokens in this "
                                   f"batch, the cache's {stream!r} holds {row.shape[0]}: the "
                                   "cache was made from another dataset or collator")
            out[b, m] = row
        return out
    shape = tuple(spec["row_shape"])
    for b, row in enumerate(rows):
        if row.shape[0] != math.prod(shape):
            raise C.CacheError(f"dataset row {index[b]}: the cache's {stream!r} holds "
                               f"{row.shape[0]} tokens, expected {math.prod(shape)}")
    return torch.stack([r.reshape(*shape, *tail) for r in rows])


class CacheCollator:
    """Collates ``(i, row)`` items with ``base`` and adds the rows' cached targets."""

    def __init__(self, base, cache: C.TeacherCache, streams: Optional[List[str]] = None):
        self.base, self.cache = base, cache
        self.streams = list(streams or cache.streams)

    def __call__(self, items):
        index = [int(i) for i, _ in items]
        batch = self.base([row for _, row in items])
        mask = B.token_mask(batch)
        stored = [self.cache.row(i, self.streams) for i in index]
        targets = {}
        for name in self.streams:
            spec = self.cache.streams[name]
            fields = stored[0][name]
            targets[name] = {}
            for f in fields:
                # padded positions: log-prob -inf (nothing, wherever the id points)
                fill = {"logprobs": float("-inf"), "weights": 0.0}.get(f, 0)
                targets[name][f] = _place([s[name][f] for s in stored], mask, spec, fill, name,
                                          index)
        return _attach(batch, targets)


def squared_error_sum(student_hidden: Tensor, target: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``Σ ||student_hidden - target||²`` over the rows where ``mask`` is True, in fp32: the
    projected-MSE loss when the target ``teacher_hidden @ P`` comes from a cache."""
    if mask is not None:
        student_hidden, target = student_hidden[mask], target[mask]
    diff = student_hidden.float() - target.float()
    return (diff * diff).sum()

