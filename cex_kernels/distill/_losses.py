"""The trainer's losses, each through the public ops, as **sums over real rows** divided by a
divisor the caller gives: the global number of real rows of the optimizer step (all
micro-batches, all ranks). So k accumulated micro-batches equal one batch k times larger and
W ranks equal one process (the Hugging Face ``num_items_in_batch`` rule).

``softmax_kl`` is imported lazily from :mod:`cex_kernels`; when the package has none,
:func:`eager_softmax_kl` (log_softmax-based, the same signature subset) stands in.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cex_kernels.distill.batch import IGNORE_INDEX
from cex_kernels.ops.projected_mse import projected_mse


def eager_softmax_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                     reduction: str = "batchmean", mask: Optional[Tensor] = None,
                     labels: Optional[Tensor] = None, ignore_index: int = -100,
                     scale_by_t2: bool = True, vocab_size: Optional[int] = None,
                     backend: str = "auto") -> Tensor:
    """KL(p_teacher || p_student), p = softmax(logits / T), times T² when ``scale_by_t2``.

    Rows are the leading dimensions; ``batchmean`` divides by the number of kept rows (rows
    with ``mask`` False or label ``ignore_index`` are dropped). ``backend`` is ignored.
    """
    del backend
    if vocab_size is not None:
        student_logits, teacher_logits = (student_logits[..., :vocab_size],
                                          teacher_logits[..., :vocab_size])
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    rows = (t.exp() * (t - s)).sum(-1)
    keep = torch.ones_like(rows, dtype=torch.bool)
    if mask is not None:
        keep = keep & mask.reshape(-1)
    if labels is not None:
        keep = keep & (labels.reshape(-1) != ignore_index)
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        out = rows.reshape(student_logits.shape[:-1])
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / keep.sum().clamp_min(1)
    if scale_by_t2:
        out = out * temperature ** 2
    return out.to(student_logits.dtype)


def softmax_kl(student_logits: Tensor, teacher_logits: Tensor, **kwargs) -> Tensor:
    """``cex_kernels.softmax_kl`` when the package has it, else :func:`eager_softmax_kl`."""
    import cex_kernels  # the package attribute, looked up per call (tests remove it)
    fused = getattr(cex_kernels, "softmax_kl", None)
    return (fused or eager_softmax_kl)(student_logits, teacher_logits, **kwargs)


def kd_loss_sum(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float,
                mask: Optional[Tensor], vocab_size: Optional[int] = None,
                backend: str = "auto") -> Tensor:
    """``T² Σ_rows KL(p_t || p_s)`` over the rows where ``mask`` is True (all when None);
    the teacher is cast to the student's dtype (under autocast the two can differ)."""
    return softmax_kl(student_logits, teacher_logits.to(student_logits.dtype),
                      temperature=temperature, reduction="sum", mask=mask,
                      vocab_size=vocab_size, backend=backend).float()


def ce_loss_sum(student_logits: Tensor, labels: Tensor) -> Tensor:
    """``Σ CE(student_logits, labels)`` over labels that are not -100 (labels aligned)."""
    return F.cross_entropy(student_logits.flatten(0, -2).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def projected_mse_sum(student_hidden: Tensor, teacher_hidden: Tensor, projection: Tensor,
                      mask: Optional[Tensor], backend: str = "auto") -> Tensor:
    """``Σ ||student_hidden - teacher_hidden @ projection||²`` over the rows where ``mask`` is
    True, via the fused op on the selected rows; teacher and projection are cast to the
    student's dtype (autocast makes the student bf16)."""
    if mask is not None:
        if mask.shape != student_hidden.shape[:-1]:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match the hidden "
                             f"state's leading dimensions {tuple(student_hidden.shape[:-1])}")
        student_hidden, teacher_hidden = student_hidden[mask], teacher_hidden[mask]
    dtype = student_hidden.dtype
    return projected_mse(student_hidden.reshape(-1, student_hidden.shape[-1]),
                         teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(dtype),
                         projection.to(dtype), reduction="sum", backend=backend).float()
