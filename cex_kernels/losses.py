"""nn.Module front-ends over the public ops (they import nothing but the public API)."""
from __future__ import annotations

import torch
from torch import nn

from cex_kernels.ops.projected_mse import projected_mse
from cex_kernels.projection import random_projection


class ProjectedMSELoss(nn.Module):
    """``MSE(student_hidden, teacher_hidden @ P)`` with a seeded random projection ``P``.

    The projection ``(d_teacher, d_student)`` is a non-persistent buffer rebuilt from
    ``(seed, kind)``: the state_dict stores those (as extra state), not the matrix. With
    ``learnable=True`` it is a Parameter initialised the same way and stored as usual
    (a FitNets-style regressor). ``forward`` casts the projection to the inputs' dtype.
    """

    def __init__(self, d_teacher: int, d_student: int, *, seed: int = 0, kind: str = "gaussian",
                 learnable: bool = False, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.d_teacher, self.d_student = d_teacher, d_student
        self.seed, self.kind, self.learnable = int(seed), kind, learnable
        self.reduction, self.backend = reduction, backend
        p = random_projection(d_teacher, d_student, seed=self.seed, kind=kind)
        if learnable:
            self.projection = nn.Parameter(p)
        else:
            self.register_buffer("projection", p, persistent=False)

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        p = self.projection
        if p.dtype != student_hidden.dtype:
            p = p.to(student_hidden.dtype)
        return projected_mse(student_hidden, teacher_hidden, p, reduction=self.reduction,
                             backend=self.backend)

    def get_extra_state(self):
        return {"seed": self.seed, "kind": self.kind, "d_teacher": self.d_teacher,
                "d_student": self.d_student, "learnable": self.learnable}

    def set_extra_state(self, state):
        if (state["d_teacher"], state["d_student"]) != (self.d_teacher, self.d_student):
            raise ValueError(f"ProjectedMSELoss: checkpoint is for ({state['d_teacher']}, "
                             f"{state['d_student']}), this module is ({self.d_teacher}, "
                             f"{self.d_student})")
        self.seed, self.kind = int(state["seed"]), state["kind"]
        if not self.learnable:  # rebuild the fixed projection where it lives now
            p = self.projection
            self.projection = random_projection(self.d_teacher, self.d_student, seed=self.seed,
                                                kind=self.kind, dtype=p.dtype, device=p.device)

    def extra_repr(self) -> str:
        return (f"d_teacher={self.d_teacher}, d_student={self.d_student}, seed={self.seed}, "
                f"kind={self.kind!r}, learnable={self.learnable}, reduction={self.reduction!r}")


class DistillKLLoss(nn.Module):
    """Logit distillation: :func:`cex_kernels.softmax_kl` (``beta=None``) or
    :func:`cex_kernels.jsd` (``beta`` in [0, 1]) with fixed settings.

    ``forward(student_logits, teacher_logits, mask=None, labels=None)``.
    """

    def __init__(self, *, temperature: float = 1.0, direction: str = "forward",
                 beta=None, reduction: str = "batchmean", ignore_index: int = -100,
                 scale_by_t2: bool = True, backend: str = "auto"):
        super().__init__()
        self.temperature, self.direction, self.beta = temperature, direction, beta
        self.reduction, self.ignore_index = reduction, ignore_index
        self.scale_by_t2, self.backend = scale_by_t2, backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask=None, labels=None) -> torch.Tensor:
        from cex_kernels.ops.softmax_kl import jsd, softmax_kl
        common = dict(temperature=self.temperature, reduction=self.reduction, mask=mask,
                      labels=labels, ignore_index=self.ignore_index,
                      scale_by_t2=self.scale_by_t2, backend=self.backend)
        if self.beta is None:
            return softmax_kl(student_logits, teacher_logits, direction=self.direction, **common)
        return jsd(student_logits, teacher_logits, beta=self.beta, **common)

    def extra_repr(self) -> str:
        kind = f"direction={self.direction!r}" if self.beta is None else f"beta={self.beta}"
        return (f"{kind}, temperature={self.temperature}, reduction={self.reduction!r}, "
                f"scale_by_t2={self.scale_by_t2}")


class LinearKLLoss(nn.Module):
    """Distillation through the student's output layer: :func:`cex_kernels.linear_kl`.

    ``forward(student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None,
    teacher_weight=None, student_bias=None, teacher_bias=None, mask=None, labels=None)``;
    pass the student's ``lm_head.weight`` (and bias) so its logits are never materialized.
    """

    def __init__(self, *, temperature: float = 1.0, direction: str = "forward", beta=None,
                 reduction: str = "batchmean", ignore_index: int = -100,
                 hard_label_weight: float = 0.0, scale_by_t2: bool = True,
                 chunk_bytes: int = 256 * 1024 * 1024, backend: str = "auto"):
        super().__init__()
        self.options = dict(temperature=temperature, direction=direction, beta=beta,
                            reduction=reduction, ignore_index=ignore_index,
                            hard_label_weight=hard_label_weight, scale_by_t2=scale_by_t2,
                            chunk_bytes=chunk_bytes, backend=backend)

    def forward(self, student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None,
                teacher_weight=None, student_bias=None, teacher_bias=None, mask=None,
                labels=None) -> torch.Tensor:
        from cex_kernels.ops.linear_kl import linear_kl
        return linear_kl(student_hidden, student_weight, teacher_logits,
                         teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                         student_bias=student_bias, teacher_bias=teacher_bias, mask=mask,
                         labels=labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "backend")
