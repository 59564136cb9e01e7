"""TRL's generalized knowledge distillation (``GKDTrainer``) with its loss computed by the fused
:func:`cex_kernels.jsd`: no ``(N, V)`` log-probabilities, mixture or KL tensors are built.

Drop-in (everything else is TRL's: on-policy generation, ``lmbda``, ``seq_kd``, DeepSpeed)::

    from cex_kernels.integrations import CexGKDTrainer as GKDTrainer

or keep TRL's class and swap the one static method::

    GKDTrainer.generalized_jsd_loss = staticmethod(cex_kernels.integrations.generalized_jsd_loss)

:class:`CexLinearGKDTrainer` goes further: neither model's ``(B, S, V)`` logits exist. Both
return their final hidden states (a forward hook on ``model.base_model``, the forward run
with ``logits_to_keep=1`` where the model takes it) and :func:`cex_kernels.linear_kl`
computes the same divergence from those and the output layers, chunk by chunk. For models
whose logits are ``lm_head(h)`` (no final soft-capping or logit scale).

The divergence, per token, is TRL's generalized JSD, which :func:`cex_kernels.jsd` follows
(``beta = 0`` the forward KL, ``beta = 1`` the reverse KL; math in ``ops/_divergence.py``).
TRL does not multiply by T², so neither does this function.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from cex_kernels.distill.hooks import first_tensor
from cex_kernels.ops.linear_kl import linear_kl
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
    return _reduce(total, student_logits.shape, labels, reduction, num_items_in_batch)


def _reduce(total: Tensor, shape, labels, reduction, num_items_in_batch) -> Tensor:
    """TRL's divisors for the summed divergence of logits of shape ``shape``."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if labels is not None:
        kept = (labels != -100).sum()
    else:
        kept = torch.tensor(shape[:-1].numel(), device=total.device)
    if reduction == "mean":
        return total / (kept * shape[-1])
    if labels is not None:
        return total / kept.clamp_min(1)
    return total / max(shape[0], 1)


def _gkd_trainer_class():
    try:  # TRL >= 0.20 keeps GKD under trl.experimental
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    return GKDTrainer


class CexGKDTrainer(_gkd_trainer_class()):
    """TRL's ``GKDTrainer`` whose ``generalized_jsd_loss`` is the fused one above."""

    generalized_jsd_loss = staticmethod(generalized_jsd_loss)


def _output_layer(model: nn.Module):
    """``(weight, bias)`` of a causal LM whose logits are ``lm_head(h)``."""
    head = model.get_output_embeddings()
    cfg = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or getattr(cfg, "final_logit_softcapping", None) \
            or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        raise ValueError(f"CexLinearGKDTrainer: {type(model).__name__}'s logits are not a plain "
                         "linear output layer of its final hidden states; use CexGKDTrainer")
    return head.weight, head.bias


def _final_hidden(wrapper: nn.Module, model: nn.Module, inputs) -> Tensor:
    """The final (normed) hidden states of ``model``, run through ``wrapper`` (DDP etc.)."""
    captured = []
    handle = model.base_model.register_forward_hook(
        lambda module, args, output: captured.append(first_tensor(output)))
    keep = {"logits_to_keep": 1} if "logits_to_keep" in \
        inspect.signature(model.forward).parameters else {}
    try:
        wrapper(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **keep)
    finally:
        handle.remove()
    return captured[-1]


class CexLinearGKDTrainer(CexGKDTrainer):
    """``GKDTrainer`` with the output layers fused into the loss (:func:`linear_kl`):
    the same loss, gradients and schedule, without ``(B, S, V)`` logits."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        hidden = _final_hidden(model, student, inputs)[:, :-1]  # position i predicts i + 1
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden = _final_hidden(self.teacher_model, teacher, inputs)[:, :-1]
        (w, b), (w_t, b_t) = _output_layer(student), _output_layer(teacher)
        labels = inputs["labels"][:, 1:]
        total = linear_kl(hidden, w, teacher_hidden=teacher_hidden, teacher_weight=w_t,
                          student_bias=b, teacher_bias=b_t, beta=float(self.beta),
                          labels=labels, reduction="sum", scale_by_t2=False)
        loss = _reduce(total, hidden.shape[:-1] + (w.shape[0],), labels, "batchmean",
                       num_items_in_batch)
        return (loss, None) if return_outputs else loss
