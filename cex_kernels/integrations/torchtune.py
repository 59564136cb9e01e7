"""torchtune's knowledge-distillation recipe with :func:`cex_kernels.linear_kl` in place of
``ForwardKLWithChunkedOutputLoss`` (+ ``CEWithChunkedOutputLoss``): the student's (and
teacher's) output layer is fused into the loss, so no chunk of logits is ever materialized.
Needs no torchtune import.

In ``recipes/knowledge_distillation_single_device.py`` (``_loss_step``), make both models
return their final normalized hidden states instead of logits, then one call gives the KD
term and the cross-entropy over the same shifted labels::

    for m in (self._model, self._teacher_model):          # once, in setup
        m.unembed = m.norm                                  # forward returns norm(h), (b, s, d)
    kd = LinearForwardKLLoss(kd_ratio=self._kd_ratio)      # replaces both loss functions

    h = self._model(tokens, mask=mask, input_pos=input_pos)
    with torch.no_grad():
        h_t = self._teacher_model(tokens, mask=mask, input_pos=input_pos)
    labels = torch.hstack((labels[..., 1:], self.ignore_labels_cache[: labels.shape[0]]))
    loss, kd_loss, class_loss = kd(h, self._model.output.weight, labels,
                                   teacher_hidden=h_t,
                                   teacher_weight=self._teacher_model.output.weight)

(Tied embeddings: ``model.output.tied_module.weight``.) ``loss`` is the recipe's
``(1 - kd_ratio) * class_loss + kd_ratio * kd_loss``. One difference in the numbers, not the
gradients: torchtune's ``ForwardKLLoss`` is the cross-entropy ``-Σ p_t log p_s``, i.e. the
KL divergence plus the teacher's entropy ``H(p_t)`` (a constant for the student);
``linear_kl`` reports the KL itself, so torchtune's logged ``kd_loss`` equals ours plus the
mean teacher entropy over the kept tokens.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from cex_kernels.ops.linear_kl import linear_kl


class LinearForwardKLLoss(nn.Module):
    """``(loss, kd_loss, class_loss)`` from the student's hidden states and output weight.

    ``kd_loss``: mean over kept tokens (label != ``ignore_index``) of KL(p_t‖p_s) at
    temperature 1 (torchtune's KD term minus the teacher entropy); ``class_loss``: the
    student's cross-entropy on ``labels`` over the same tokens; ``loss = (1 - kd_ratio) *
    class_loss + kd_ratio * kd_loss``. The teacher is ``teacher_logits`` or
    ``teacher_hidden`` + ``teacher_weight`` (its logits then built chunk by chunk too).
    ``kd_loss`` and ``class_loss`` are detached, for logging.
    """

    def __init__(self, kd_ratio: float = 0.5, ignore_index: int = -100,
                 chunk_bytes: Optional[int] = None):
        super().__init__()
        if not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio!r}")
        self.kd_ratio, self.ignore_index, self.chunk_bytes = kd_ratio, ignore_index, chunk_bytes

    def forward(self, student_hidden: Tensor, student_weight: Tensor, labels: Tensor,
                teacher_logits: Optional[Tensor] = None, *,
                teacher_hidden: Optional[Tensor] = None,
                teacher_weight: Optional[Tensor] = None):
        extra = {} if self.chunk_bytes is None else {"chunk_bytes": self.chunk_bytes}
        return linear_kl(student_hidden, student_weight, teacher_logits,
                         teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                         labels=labels, ignore_index=self.ignore_index,
                         soft_label_weight=self.kd_ratio, hard_label_weight=1.0 - self.kd_ratio,
                         scale_by_t2=False, reduction="batchmean", return_parts=True, **extra)
