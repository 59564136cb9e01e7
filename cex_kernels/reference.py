"""The ``reference`` backend: eager PyTorch formulas for every op, written for clarity.

They run as the ``reference`` backend's kernels (adapter: ``_backends/reference.py``), and
the fused ops call the loss-level ones where a closed-form gradient cannot serve (double
backward, ``torch.func``). They are *not* the tests' ground truth: the tests check every
backend, this one included, against the float64 math in ``tests/oracle.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cex_kernels.ops._divergence import direction_beta, kept_rows


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


# --- softmax_kl / jsd -----------------------------------------------------------------------

def _xlogy_ratio(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """``p * (log_p - log_r)`` with 0·log 0 = 0, and gradients that stay finite where p == 0."""
    keep = p > 0
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    return torch.where(keep, p * (torch.where(keep, log_p, zero) - torch.where(keep, log_r, zero)),
                       zero)


def generalized_jsd_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                         beta: float, symmetric: bool = False) -> torch.Tensor:
    """Per-row divergence (shape ``(...)``) between softmax(student/T) and softmax(teacher/T).

    ``beta`` and ``symmetric`` pick the divergence as in the math of ``ops/_divergence.py``
    (beta = 0 forward KL, beta = 1 reverse KL, else the generalized JSD or, ``symmetric``,
    the symmetric KL with forward weight 1 - beta). Differentiable (the ops' double backward).
    """
    ls = F.log_softmax(student / temperature, dim=-1)
    lt = F.log_softmax(teacher / temperature, dim=-1)
    if beta == 0:
        return _xlogy_ratio(lt.exp(), lt, ls).sum(-1)
    if beta == 1:
        return _xlogy_ratio(ls.exp(), ls, lt).sum(-1)
    if symmetric:
        return ((1 - beta) * _xlogy_ratio(lt.exp(), lt, ls).sum(-1)
                + beta * _xlogy_ratio(ls.exp(), ls, lt).sum(-1))
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    return (beta * _xlogy_ratio(lt.exp(), lt, lm).sum(-1)
            + (1 - beta) * _xlogy_ratio(ls.exp(), ls, lm).sum(-1))


def _kept_rows(shape, device, mask, labels, ignore_index) -> torch.Tensor:
    return kept_rows(shape, device, mask, labels, ignore_index).reshape(shape)


def jsd(student: torch.Tensor, teacher: torch.Tensor, *, beta: float = 0.5,
        temperature: float = 1.0, reduction: str = "batchmean", mask=None, labels=None,
        ignore_index: int = -100, scale_by_t2: bool = True,
        symmetric: bool = False) -> torch.Tensor:
    """Eager ``cex_kernels.jsd`` (``symmetric``: the symmetric KL with reverse weight
    ``beta``): per-row divergences, dropped rows zeroed, then reduced."""
    rows = generalized_jsd_rows(student, teacher, temperature, beta, symmetric)
    keep = _kept_rows(rows.shape, rows.device, mask, labels, ignore_index)
    rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if scale_by_t2:
        rows = rows * temperature ** 2
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum().clamp(min=1)


def softmax_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0,
               direction: str = "forward", forward_weight=None, **kwargs) -> torch.Tensor:
    """Eager ``cex_kernels.softmax_kl`` (``direction`` and ``forward_weight`` as there)."""
    beta, symmetric = direction_beta(direction, forward_weight)
    return jsd(student, teacher, beta=beta, symmetric=symmetric, temperature=temperature,
               **kwargs)


def _row_log_softmaxes(student, teacher, row_weight, inv_temperature):
    """What every reference row kernel starts from: the accumulation dtype (fp32, float64
    for float64), the row weights ``w (N, 1)``, ``kept = w != 0`` and both rows'
    log-softmaxes at temperature T, taken around the raw row max as every backend does."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    w = row_weight.to(acc)[:, None]

    def log_softmax(x):
        x = x.to(acc)
        return F.log_softmax((x - x.amax(-1, keepdim=True)) * inv_temperature, dim=-1)

    return acc, w, w != 0, log_softmax(student), log_softmax(teacher)


def softmax_kl_rows(student: torch.Tensor, teacher: torch.Tensor, row_weight: torch.Tensor,
                    inv_temperature: float, beta: float, symmetric: bool, grad_student: bool,
                    grad_teacher: bool):
    """The ``reference`` backend's kernel contract (see ``ops/_divergence.py``).

    2-D logits, ``beta`` in [0, 1) (beta = 1 is handled by swapping the inputs). Returns
    ``(row_loss, grad_student, grad_teacher)``: ``row_loss[r] = w[r] * L_r`` (0 where
    ``w[r] == 0``) and ``grad = w[r] / T * dL_r/dz`` written from closed forms; fp32
    accumulation (float64 for float64). As every backend: the log-softmax is taken around
    the raw row max, ``(x - max x) / T`` (exact for small T, large offsets and logits near
    the float maximum), and a kept row whose loss is NaN gets NaN in every entry of each
    requested gradient.
    """
    acc, w, kept, ls, lt = _row_log_softmaxes(student, teacher, row_weight, inv_temperature)
    p, q = ls.exp(), lt.exp()
    zero = torch.zeros((), dtype=acc, device=student.device)
    # symmetric vs KL decided on beta in the accumulation dtype, as the kernels do
    if symmetric and float(torch.tensor(beta, dtype=acc)) > 0:
        fwd = torch.where(q == 0, zero, q * (lt - ls)).sum(-1, keepdim=True)
        rev = torch.where(p == 0, zero, p * (ls - lt)).sum(-1, keepdim=True)
        loss = (1 - beta) * fwd + beta * rev
        d_s = (1 - beta) * (p - q) + beta * torch.where(p == 0, zero, p * (ls - lt - rev))
        d_t = (1 - beta) * torch.where(q == 0, zero, q * (lt - ls - fwd)) + beta * (q - p)
    elif beta == 0 or symmetric:  # KL(q || p)
        terms = torch.where(q == 0, zero, q * (lt - ls))
        loss = terms.sum(-1, keepdim=True)
        d_s = p - q
        d_t = torch.where(q == 0, zero, q * (lt - ls - loss))
    else:
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        kt = torch.where(q == 0, zero, q * (lt - lm)).sum(-1, keepdim=True)
        ks = torch.where(p == 0, zero, p * (ls - lm)).sum(-1, keepdim=True)
        loss = beta * kt + (1 - beta) * ks
        d_s = torch.where(p == 0, zero, (1 - beta) * p * (ls - lm - ks))
        d_t = torch.where(q == 0, zero, beta * q * (lt - lm - kt))
    row_loss = torch.where(kept, w * loss, zero)[:, 0]
    # The NaN rule: a NaN scale makes every entry NaN, even the 0 of a q == 0 entry.
    g_scale = torch.where(torch.isnan(loss), math.nan, w * inv_temperature)

    def grad(d, want, like):
        if not want:
            return like.new_empty((0,))
        return torch.where(kept, g_scale * d, zero).to(like.dtype)

    return row_loss, grad(d_s, grad_student, student), grad(d_t, grad_teacher, teacher)


def linear_kl(student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None,
              teacher_weight=None, student_bias=None, teacher_bias=None, temperature=1.0,
              direction="forward", beta=None, forward_weight=None, symmetric=False,
              reduction="batchmean", mask=None, labels=None, ignore_index=-100,
              hard_label_weight=0.0, soft_label_weight=1.0, scale_by_t2=True,
              return_parts=False):
    """Eager ``cex_kernels.linear_kl``: materialize both logits, then ``soft_label_weight``
    times the eager divergence plus ``hard_label_weight`` times the cross-entropy on the
    kept rows (same reduction); ``return_parts`` also returns the two unweighted parts."""
    if beta is None:  # (else beta and symmetric as given: the resolved form the op passes)
        beta, symmetric = direction_beta(direction, forward_weight)

    def divergence(logits, teacher):
        return jsd(logits, teacher, beta=beta, symmetric=symmetric, temperature=temperature,
                   reduction=reduction, mask=mask, labels=labels, ignore_index=ignore_index,
                   scale_by_t2=scale_by_t2)

    return _linear_loss(divergence, student_hidden, student_weight, teacher_logits,
                        teacher_hidden, teacher_weight, student_bias, teacher_bias, reduction,
                        mask, labels, ignore_index, hard_label_weight, soft_label_weight,
                        return_parts)


def _linear_loss(divergence, student_hidden, student_weight, teacher_logits, teacher_hidden,
                 teacher_weight, student_bias, teacher_bias, reduction, mask, labels,
                 ignore_index, hard_label_weight, soft_label_weight, return_parts):
    """A fused-linear loss, eagerly: ``divergence(student logits, teacher logits)`` (reduced)
    weighted with the hard-label cross-entropy over the kept rows."""
    logits = F.linear(student_hidden, student_weight, student_bias)
    if teacher_logits is None:
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    kd = divergence(logits, teacher_logits.detach())
    ce_loss = torch.zeros_like(kd)
    if labels is not None and (hard_label_weight > 0 or return_parts):
        keep = _kept_rows(logits.shape[:-1], logits.device, mask, labels, ignore_index)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                             torch.where(keep, labels, 0).reshape(-1), reduction="none")
        ce = torch.where(keep.reshape(-1), ce, torch.zeros((), dtype=ce.dtype)).reshape(keep.shape)
        if reduction == "none":
            ce_loss = ce
        elif reduction == "sum":
            ce_loss = ce.sum()
        else:
            ce_loss = ce.sum() / keep.sum().clamp(min=1)
    loss = soft_label_weight * kd + hard_label_weight * ce_loss
    return (loss, kd, ce_loss) if return_parts else loss


# --- tvd --------------------------------------------------------------------------------------

def tvd_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
             beta: float = 0.0, symmetric: bool = False) -> torch.Tensor:
    """Per-row total variation distance ``1/2 sum |softmax(student/T) - softmax(teacher/T)|``
    (shape ``(...)``). Differentiable (autograd's subgradient of |x| at 0 is 0, as the
    kernels'). ``beta``/``symmetric`` are ignored (the fused-linear row-loss signature)."""
    p = F.softmax(student / temperature, dim=-1)
    q = F.softmax(teacher / temperature, dim=-1)
    return 0.5 * (p - q).abs().sum(-1)


def tvd(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0,
        reduction: str = "batchmean", mask=None, labels=None,
        ignore_index: int = -100) -> torch.Tensor:
    """Eager ``cex_kernels.tvd``: per-row distances, dropped rows zeroed, then reduced."""
    rows = tvd_rows(student, teacher, temperature)
    keep = _kept_rows(rows.shape, rows.device, mask, labels, ignore_index)
    rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum().clamp(min=1)


def tvd_row_kernel(student: torch.Tensor, teacher: torch.Tensor, row_weight: torch.Tensor,
                   inv_temperature: float, grad_student: bool, grad_teacher: bool):
    """The ``reference`` backend's TVD row kernel (contract in ``ops/tvd.py``): closed-form
    gradients ``w/T · 1/2 p (sg - Sp)`` and ``w/T · 1/2 q (Sq - sg)``, sg = sign(p - q),
    around the raw row max, with the NaN rule; fp32 accumulation (float64 for float64)."""
    acc, w, kept, ls, lt = _row_log_softmaxes(student, teacher, row_weight, inv_temperature)
    p, q = ls.exp(), lt.exp()
    sg = torch.sign(p - q)
    loss = 0.5 * (p - q).abs().sum(-1, keepdim=True)
    zero = torch.zeros((), dtype=acc, device=student.device)
    row_loss = torch.where(kept, w * loss, zero)[:, 0]
    g_scale = torch.where(torch.isnan(loss), math.nan, 0.5 * w * inv_temperature)

    def grad(d, want, like):
        if not want:
            return like.new_empty((0,))
        return torch.where(kept, g_scale * d, zero).to(like.dtype)

    return (row_loss, grad(p * (sg - (p * sg).sum(-1, keepdim=True)), grad_student, student),
            grad(q * ((q * sg).sum(-1, keepdim=True) - sg), grad_teacher, teacher))


def linear_tvd(student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None,
               teacher_weight=None, student_bias=None, teacher_bias=None, temperature=1.0,
               reduction="batchmean", mask=None, labels=None, ignore_index=-100,
               hard_label_weight=0.0, soft_label_weight=1.0, return_parts=False):
    """Eager ``cex_kernels.linear_tvd``: as :func:`linear_kl` with the TVD."""
    def divergence(logits, teacher):
        return tvd(logits, teacher, temperature=temperature, reduction=reduction, mask=mask,
                   labels=labels, ignore_index=ignore_index)

    return _linear_loss(divergence, student_hidden, student_weight, teacher_logits,
                        teacher_hidden, teacher_weight, student_bias, teacher_bias, reduction,
                        mask, labels, ignore_index, hard_label_weight, soft_label_weight,
                        return_parts)
