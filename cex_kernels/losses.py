"""nn.Module front-ends over the public ops. Each checks its options at construction (a bad
option fails where the module is built, not at the first forward) with the same checks
as its functional op."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from cex_kernels import _backends, _checks
from cex_kernels.ops import _divergence
from cex_kernels.ops.linear_kl import check_options as _check_linear_kl
from cex_kernels.ops.linear_kl import linear_kl
from cex_kernels.ops.projected_mse import REDUCTIONS as _MSE_REDUCTIONS
from cex_kernels.ops.projected_mse import projected_mse
from cex_kernels.ops.softmax_kl import jsd, softmax_kl
from cex_kernels.ops.tvd import tvd
from cex_kernels.projection import PROJECTION_KINDS, check_seed, random_projection


class ProjectedMSELoss(nn.Module):
    """Hidden-state matching between a student and a teacher of different widths.

    * ``learnable=False`` (curriculum extraction): ``MSE(student_hidden, teacher_hidden @ P)``
      with a fixed seeded random projection ``P (d_teacher, d_student)``. ``P`` is a
      non-persistent buffer rebuilt from ``(seed, kind)``: the state_dict stores those (as
      extra state), not the matrix.
    * ``learnable=True`` (FitNets, Romero et al. 2015): a trainable regressor
      ``W (d_student, d_teacher)`` maps the *student* into the teacher's space,
      ``MSE(student_hidden @ W, teacher_hidden)``. The teacher's features are the fixed
      target, so joint training cannot shrink the loss by shrinking ``W`` (projecting the
      teacher instead would let both collapse to 0). ``W`` is a Parameter initialised from
      ``random_projection(d_student, d_teacher, seed=seed, kind=kind)`` and stored as usual.

    ``forward`` casts ``P``/``W`` to the inputs' dtype. ``reduction`` as
    :func:`cex_kernels.projected_mse` (the mean is over the projected space: ``d_student``
    features per row, or ``d_teacher`` for the learnable regressor).
    """

    def __init__(self, d_teacher: int, d_student: int, *, seed: int = 0, kind: str = "gaussian",
                 learnable: bool = False, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        name = "ProjectedMSELoss"
        self.d_teacher = _checks.check_int(name, "d_teacher", d_teacher, low=1)
        self.d_student = _checks.check_int(name, "d_student", d_student, low=1)
        self.seed = check_seed(name, seed)
        _checks.check_choice(name, "kind", kind, PROJECTION_KINDS)
        self.kind = kind
        self.learnable = _checks.check_bool(name, "learnable", learnable)
        _checks.check_choice(name, "reduction", reduction, _MSE_REDUCTIONS)
        self.reduction, self.backend = reduction, _backends.check_backend_name(name, backend)
        if self.learnable:
            self.regressor = nn.Parameter(random_projection(self.d_student, self.d_teacher,
                                                            seed=self.seed, kind=kind))
        else:
            self.register_buffer("projection", random_projection(
                self.d_teacher, self.d_student, seed=self.seed, kind=kind), persistent=False)

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        if self.learnable:  # MSE(s @ W, t): the fused op with the roles swapped
            w = self.regressor
            w = w if w.dtype == student_hidden.dtype else w.to(student_hidden.dtype)
            return projected_mse(teacher_hidden, student_hidden, w, reduction=self.reduction,
                                 backend=self.backend)
        p = self.projection
        p = p if p.dtype == student_hidden.dtype else p.to(student_hidden.dtype)
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
        if bool(state.get("learnable", False)) != self.learnable:
            raise ValueError(f"ProjectedMSELoss: checkpoint has learnable="
                             f"{state.get('learnable')}, this module learnable={self.learnable}")
        self.seed, self.kind = int(state["seed"]), state["kind"]
        if not self.learnable:  # rebuild the fixed projection where it lives now
            p = self.projection
            self.projection = random_projection(self.d_teacher, self.d_student, seed=self.seed,
                                                kind=self.kind, dtype=p.dtype, device=p.device)

    def extra_repr(self) -> str:
        return (f"d_teacher={self.d_teacher}, d_student={self.d_student}, seed={self.seed}, "
                f"kind={self.kind!r}, learnable={self.learnable}, reduction={self.reduction!r}")


class DistillKLLoss(nn.Module):
    """Logit distillation: :func:`cex_kernels.softmax_kl` (``beta=None``; ``direction``
    "forward", "reverse" or "symmetric" with ``forward_weight``) or :func:`cex_kernels.jsd`
    (``beta`` in [0, 1]) with fixed settings.

    ``forward(student_logits, teacher_logits, mask=None, labels=None)``.
    """

    def __init__(self, *, temperature: float = 1.0, direction: str = "forward",
                 forward_weight=None, beta=None, reduction: str = "batchmean",
                 ignore_index: int = -100, scale_by_t2: bool = True, backend: str = "auto"):
        super().__init__()
        name = "DistillKLLoss"
        self.temperature, self.ignore_index, self.scale_by_t2 = _divergence.check_options(
            name, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
            scale_by_t2=scale_by_t2, backend=backend)
        _divergence.check_direction(name, direction, forward_weight)  # (raises if bad)
        if forward_weight is not None:
            forward_weight = float(forward_weight)
        if beta is not None:
            if direction != "forward":
                raise ValueError(f"cex_kernels.{name}: give either direction= or beta= (JSD), "
                                 "not both")
            beta = _divergence.check_beta(name, beta)
        self.direction, self.forward_weight, self.beta = direction, forward_weight, beta
        self.reduction, self.backend = reduction, backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask=None, labels=None) -> torch.Tensor:
        common = dict(temperature=self.temperature, reduction=self.reduction, mask=mask,
                      labels=labels, ignore_index=self.ignore_index,
                      scale_by_t2=self.scale_by_t2, backend=self.backend)
        if self.beta is None:
            return softmax_kl(student_logits, teacher_logits, direction=self.direction,
                              forward_weight=self.forward_weight, **common)
        return jsd(student_logits, teacher_logits, beta=self.beta, **common)

    def extra_repr(self) -> str:
        kind = f"direction={self.direction!r}" if self.beta is None else f"beta={self.beta}"
        if self.forward_weight is not None:
            kind += f", forward_weight={self.forward_weight}"
        return (f"{kind}, temperature={self.temperature}, reduction={self.reduction!r}, "
                f"scale_by_t2={self.scale_by_t2}")


class LinearKLLoss(nn.Module):
    """Distillation through the student's output layer: :func:`cex_kernels.linear_kl`.

    ``forward(student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None,
    teacher_weight=None, student_bias=None, teacher_bias=None, mask=None, labels=None)``;
    pass the student's ``lm_head.weight`` (and bias) so its logits are never materialized.
    With ``return_parts=True`` it returns ``(loss, kd, ce)`` (the parts detached, for logging).
    """

    def __init__(self, *, temperature: float = 1.0, direction: str = "forward",
                 forward_weight=None, beta=None, reduction: str = "batchmean",
                 ignore_index: int = -100,
                 hard_label_weight: float = 0.0, soft_label_weight: float = 1.0,
                 scale_by_t2: bool = True, chunk_bytes: Optional[int] = None,
                 algorithm: str = "auto", backend: str = "auto", return_parts: bool = False):
        super().__init__()
        name = "LinearKLLoss"
        _check_linear_kl(name, temperature=temperature, direction=direction,
                         forward_weight=forward_weight, beta=beta,
                         reduction=reduction, ignore_index=ignore_index,
                         hard_label_weight=hard_label_weight,
                         soft_label_weight=soft_label_weight, scale_by_t2=scale_by_t2,
                         chunk_bytes=chunk_bytes, algorithm=algorithm, backend=backend)
        _checks.check_bool(name, "return_parts", return_parts)
        self.options = dict(temperature=temperature, direction=direction,
                            forward_weight=forward_weight, beta=beta,
                            reduction=reduction, ignore_index=ignore_index,
                            hard_label_weight=hard_label_weight,
                            soft_label_weight=soft_label_weight, scale_by_t2=scale_by_t2,
                            chunk_bytes=chunk_bytes, algorithm=algorithm, backend=backend,
                            return_parts=return_parts)

    def forward(self, student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None,
                teacher_weight=None, student_bias=None, teacher_bias=None, mask=None,
                labels=None):
        return linear_kl(student_hidden, student_weight, teacher_logits,
                         teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                         student_bias=student_bias, teacher_bias=teacher_bias, mask=mask,
                         labels=labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "backend")


class TVDLoss(nn.Module):
    """Logit distillation by total variation distance: :func:`cex_kernels.tvd` with fixed
    settings (no T² factor: see ``ops/tvd.py``).

    ``forward(student_logits, teacher_logits, mask=None, labels=None)``.
    """

    def __init__(self, *, temperature: float = 1.0, reduction: str = "batchmean",
                 ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        self.temperature, self.ignore_index, _ = _divergence.check_options(
            "TVDLoss", temperature=temperature, reduction=reduction, ignore_index=ignore_index,
            scale_by_t2=False, backend=backend)
        self.reduction, self.backend = reduction, backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask=None, labels=None) -> torch.Tensor:
        return tvd(student_logits, teacher_logits, temperature=self.temperature,
                   reduction=self.reduction, mask=mask, labels=labels,
                   ignore_index=self.ignore_index, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"
