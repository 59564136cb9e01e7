"""The trainer's two losses, each through the public ops.

``softmax_kl`` is imported lazily from :mod:`cex_kernels` (it may be added after this module);
when the package has none, :func:`eager_softmax_kl` (log_softmax-based, the same signature
subset) stands in, so the trainer works either way.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def eager_softmax_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                     reduction: str = "batchmean", labels: Optional[Tensor] = None,
                     ignore_index: int = -100, scale_by_t2: bool = True,
                     backend: str = "auto") -> Tensor:
    """KL(p_teacher || p_student), p = softmax(logits / T), times T² when ``scale_by_t2``.

    Rows are the leading dimensions; ``batchmean`` divides by the number of kept rows (rows
    whose label is ``ignore_index`` are dropped). ``backend`` is accepted and ignored.
    """
    del backend
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    rows = (t.exp() * (t - s)).sum(-1)
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
        rows = rows * keep
        n = keep.sum().clamp_min(1)
    else:
        n = rows.shape[0]
    if reduction == "none":
        out = rows.reshape(student_logits.shape[:-1])
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / n
    if scale_by_t2:
        out = out * temperature ** 2
    return out.to(student_logits.dtype)


def softmax_kl(student_logits: Tensor, teacher_logits: Tensor, **kwargs) -> Tensor:
    """``cex_kernels.softmax_kl`` when the package has it, else :func:`eager_softmax_kl`."""
    import cex_kernels
    fused = getattr(cex_kernels, "softmax_kl", None)
    return (fused or eager_softmax_kl)(student_logits, teacher_logits, **kwargs)


def logit_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, *,
                            temperature: float, hard_label_weight: float = 0.0,
                            labels: Optional[Tensor] = None, ignore_index: int = -100,
                            backend: str = "auto") -> Tensor:
    """``(1 - w) * T² KL(p_t || p_s) + w * CE(student_logits, labels)``, w = hard_label_weight.

    The teacher is cast to the student's dtype (under autocast the two can differ).
    ``labels`` align with the logits' leading dimensions (shift them yourself for LMs).
    """
    teacher_logits = teacher_logits.to(student_logits.dtype)
    kl = softmax_kl(student_logits, teacher_logits, temperature=temperature,
                    reduction="batchmean", backend=backend)
    if hard_label_weight == 0.0:
        return kl
    if labels is None:
        raise ValueError("hard_label_weight > 0 needs labels in the batch")
    ce = F.cross_entropy(student_logits.flatten(0, -2).float(), labels.reshape(-1),
                         ignore_index=ignore_index)
    return (1.0 - hard_label_weight) * kl + hard_label_weight * ce.to(kl.dtype)


def hidden_state_loss(student_hidden: Tensor, teacher_hidden: Tensor, projection: Tensor, *,
                      backend: str = "auto") -> Tensor:
    """``MSE(student_hidden, teacher_hidden @ projection)`` via the fused op; teacher and
    projection are cast to the student's dtype (autocast makes the student bf16)."""
    from cex_kernels import projected_mse
    dtype = student_hidden.dtype
    return projected_mse(student_hidden, teacher_hidden.to(dtype), projection.to(dtype),
                         backend=backend)
