"""Eager PyTorch implementations: the ground truth for tests and the ``reference`` backend.

Plain PyTorch, written for clarity; in float64 they are the reference every kernel is
tested against, and with autograd they give the reference gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def projected_mse(student: torch.Tensor, teacher: torch.Tensor, projection: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """``F.mse_loss(student, teacher @ projection)``; ``"none"`` sums each row's squared error."""
    target = teacher @ projection
    if reduction == "none":
        return ((student - target) ** 2).sum(-1)
    return F.mse_loss(student, target, reduction=reduction)


def projected_mse_rows(student: torch.Tensor, teacher: torch.Tensor, projection: torch.Tensor,
                       grad_scale: float, compute_grad: bool):
    """The ``reference`` backend's kernel contract (see ``ops/projected_mse.py``).

    2-D inputs; returns ``(row_sq_err, grad)`` with fp32 accumulation (float64 for float64).
    It materializes the product: this is eager PyTorch, not a fused kernel.
    """
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    diff = student.to(acc) - teacher.to(acc) @ projection.to(acc)
    row_sq_err = (diff * diff).sum(-1)
    grad = ((diff * grad_scale).to(student.dtype) if compute_grad
            else student.new_empty((0,)))
    return row_sq_err, grad
