"""TRL's generalized knowledge distillation (``GKDTrainer``) with its loss computed by the fused
:func:`cex_kernels.jsd`: no ``(N, V)`` log-probabilities, mixture or KL tensors are built.

Drop-in (everything else is TRL's: on-policy generation, ``lmbda``, ``seq_kd``, DeepSpeed)::

    from cex_kernels.integrations import CexGKDTrainer as GKDTrainer

or keep TRL's class and swap the one static method::

    GKDTrainer.generalized_jsd_loss = staticmethod(cex_kernels.integrations.generalized_jsd_loss)

The divergence, per token, with ``p_s, p_t = softmax(logits / T)`` and ``m = beta·p_t +
(1 - beta)·p_s``: ``beta·KL(p_t‖m) + (1 - beta)·KL(p_s‖m)``; ``beta = 0`` is KL(p_t‖p_s)
and ``beta = 1`` KL(p_s‖p_t) (TRL's convention, which :func:`cex_kernels.jsd` follows). TRL
does not multiply by T², so neither does this function.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from cex_kernels.ops.softmax_kl import jsd


def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor,
                         labels: Optional[Tensor] = None, beta: float = 0.5,
                         temperature: float = 1.0, reduction: str = "batchmean",
                         num_items_in_batch=None) -> Tensor:
    """``GKDTrainer.generalized_jsd_loss`` with TRL's signature and reductions, fused.

    Tokens whose label is -100 are dropped. With ``num_items_in_batch``: the sum over kept
    tokens divided by it. Else ``"batchmean"``: divided by the number of kept tokens (with
    labels) or by the batch size ``student_logits.shape[0]`` (without: TRL's rule),
    ``"sum"``, or ``"mean"``: divided by the number of kept elements (tokens × vocabulary,
    TRL's ``jsd.mean()``). TRL's ``"none"`` returns per-vocabulary-entry terms, which a fused
    kernel never forms: it is refused here (use ``cex_kernels.jsd(..., reduction="none")``
    for per-token values).
    """
    if reduction not in ("batchmean", "sum", "mean"):
        raise ValueError(f"generalized_jsd_loss: reduction must be 'batchmean', 'sum' or 'mean' "
                         f"(TRL's 'none' is per vocabulary entry, which the fused kernel never "
                         f"forms), got {reduction!r}")
    total = jsd(student_logits, teacher_logits, beta=float(beta), temperature=temperature,
                reduction="sum", labels=labels, scale_by_t2=False)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if labels is not None:
        kept = (labels != -100).sum()
    else:
        kept = torch.tensor(student_logits.shape[:-1].numel(), device=total.device)
    if reduction == "mean":
        return total / (kept * student_logits.shape[-1])
    if labels is not None:
        return total / kept.clamp_min(1)
    return total / max(student_logits.shape[0], 1)


def _gkd_trainer_class():
    try:  # TRL >= 0.20 keeps GKD under trl.experimental
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    return GKDTrainer


class CexGKDTrainer(_gkd_trainer_class()):
    """TRL's ``GKDTrainer`` whose ``generalized_jsd_loss`` is the fused one above."""

    generalized_jsd_loss = staticmethod(generalized_jsd_loss)
