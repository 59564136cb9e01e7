"""What a batch says about its rows: the real-token mask, the labels aligned with the logits,
and how many rows each loss averages over.

Batches are a dict (Hugging Face style: ``input_ids``, ``attention_mask``, ``labels``, ...), a
tuple/list ``(inputs, labels?)`` or a tensor. A loss compares outputs with leading
dimensions ``lead`` (hidden states ``(B, S)``, logits ``(B, S)`` or ``(B,)``). Its rows
(:class:`RowRule`, fixed per phase from the first batch):

- ``attention_mask`` has shape ``lead``: the real tokens (``attention_mask == 1``);
- else ``lead`` is a prefix of the inputs' shape (tokens ``(B, S)``, features ``(B, d)``):
  every one of those rows, counted from each batch's own inputs;
- else a fixed number of rows per sample (``prod(lead) / B``).

Cross-entropy reads rows whose aligned label is not -100.
"""
from __future__ import annotations

import math
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


class RowRule:
    """How to count (and mask) the rows of one loss in any batch, learnt from one batch and
    the leading dimensions ``lead`` of the outputs that loss compares."""

    def __init__(self, batch, lead):
        lead, x, mask = tuple(lead), model_inputs(batch), token_mask(batch)
        self.masked, self.prefix, self.per_sample = False, None, None
        if mask is not None and tuple(mask.shape) == lead:
            self.masked = True
        elif tuple(x.shape[:len(lead)]) == lead:
            self.prefix = len(lead)
        else:
            total, n = math.prod(lead), x.shape[0] if x.dim() else 1
            if n == 0 or total % n:
                raise ValueError(f"cannot tell the rows of outputs with leading dimensions {lead} "
                                 f"from inputs of shape {tuple(x.shape)}; give dict batches with "
                                 "an attention_mask of that shape")
            self.per_sample = total // n

    def mask(self, batch) -> Optional[Tensor]:
        return token_mask(batch) if self.masked else None

    def count(self, batch) -> int:
        if self.masked:
            return int(token_mask(batch).sum())
        x = model_inputs(batch)
        if self.prefix is not None:
            return math.prod(x.shape[:self.prefix])
        return x.shape[0] * self.per_sample


def count_labels(batch, shift: bool) -> int:
    """Rows the cross-entropy averages over (aligned labels that are not -100)."""
    labels = aligned_labels(batch, shift)
    return 0 if labels is None else int((labels != IGNORE_INDEX).sum())


def is_causal_lm(model) -> bool:
    """A Hugging Face causal LM (``...ForCausalLM``, ``...LMHeadModel``): shift labels."""
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))
