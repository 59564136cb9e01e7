"""What a batch says about its rows: the real-token mask, the labels aligned with the logits,
and how many rows each loss averages over.

Batches are a dict (Hugging Face style: ``input_ids``, ``attention_mask``, ``labels``, ...), a
tuple/list ``(inputs, labels?)`` or a tensor. The **real tokens** are ``attention_mask == 1``
when the batch has one, else every row. Every loss reads only real tokens: projected-MSE and
KL over the real-token rows, cross-entropy over rows whose aligned label is not -100.

Counts: without a mask a batch has ``inputs.numel()`` rows when the inputs are integer token
ids, else ``inputs.shape[0]`` (feature vectors). The methods check this against the model's
outputs on the first batch and say so when it does not fit.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

IGNORE_INDEX = -100


def model_inputs(batch) -> Tensor:
    """The tensor that sets the batch's shape: ``input_ids`` (or the first tensor) of a dict,
    ``batch[0]`` of a tuple, or the batch itself."""
    if isinstance(batch, dict):
        if isinstance(batch.get("input_ids"), Tensor):
            return batch["input_ids"]
        return next(v for k, v in batch.items() if isinstance(v, Tensor) and k != "labels")
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def token_mask(batch) -> Optional[Tensor]:
    """Bool ``(B, S)``: True on real tokens (``attention_mask``), or None (every row is real)."""
    if isinstance(batch, dict) and batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool()
    return None


def raw_labels(batch) -> Optional[Tensor]:
    if isinstance(batch, dict):
        return batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    return None


def aligned_labels(batch, shift: bool) -> Optional[Tensor]:
    """The hard labels aligned with the logits' rows, -100 where no loss is taken.

    Padding (``attention_mask == 0``) is set to -100. With ``shift`` (causal LMs, the
    Hugging Face convention ``labels = input_ids``), row t is labelled with token t + 1 and
    the last row with -100. Masked-LM and classification labels are used as given."""
    labels = raw_labels(batch)
    if labels is None:
        return None
    mask = token_mask(batch)
    if mask is not None and mask.shape == labels.shape:
        labels = labels.masked_fill(~mask, IGNORE_INDEX)
    if shift:
        labels = torch.cat([labels[..., 1:], labels.new_full(labels.shape[:-1] + (1,),
                                                             IGNORE_INDEX)], dim=-1)
    return labels


def count_rows(batch) -> int:
    """Rows the projected-MSE / KL losses average over (real tokens)."""
    mask = token_mask(batch)
    if mask is not None:
        return int(mask.sum())
    x = model_inputs(batch)
    return x.numel() if not (x.dtype.is_floating_point or x.dtype.is_complex) else x.shape[0]


def count_labels(batch, shift: bool) -> int:
    """Rows the cross-entropy averages over (aligned labels that are not -100)."""
    labels = aligned_labels(batch, shift)
    return 0 if labels is None else int((labels != IGNORE_INDEX).sum())


def is_causal_lm(model) -> bool:
    """A Hugging Face causal LM (``...ForCausalLM``, ``...LMHeadModel``): shift labels."""
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))
