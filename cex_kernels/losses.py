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
