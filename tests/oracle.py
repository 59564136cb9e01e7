"""The tests' float64 oracle, written from the math (never ``cex_kernels.reference``, which
is also a backend under test). One place, so the test files that check kernels against it
agree on what "correct" means: the divergences per row, and the public losses built on
them (masking, reductions, T², the hard-label term), differentiable for reference gradients.
Inputs are used as given (the tests pass float64 copies), so gradients reach them.

``p = softmax(student / T)``, ``q = softmax(teacher / T)``, 0·log 0 = 0:
beta = 0: KL(q || p); beta = 1: KL(p || q); otherwise the generalized JSD
beta·KL(q || m) + (1 - beta)·KL(p || m), m = beta·q + (1 - beta)·p; ``forward_weight=r``
(the symmetric KL): r·KL(q || p) + (1 - r)·KL(p || q), a zero weight dropping its term.
"""
import math

import torch
import torch.nn.functional as F


def kl_terms(log_a, log_b):
    """sum a (log a - log b) over the last dim; terms with a = 0 are 0, with a 0 gradient
    (every log that meets a = 0 is masked first, so autograd never sees 0 * inf)."""
    a = log_a.exp()
    live = a > 0
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.where(live, a * (torch.where(live, log_a, zero) - torch.where(live, log_b, zero)),
                       zero).sum(-1)


def divergence_rows(student, teacher, *, temperature=1.0, beta=0.0, forward_weight=None):
    """Per-row divergence of float64 copies of the logits (differentiable)."""
    ls = F.log_softmax(student.double() / temperature, dim=-1)
    lt = F.log_softmax(teacher.double() / temperature, dim=-1)
    if forward_weight is not None:
        r = forward_weight
        rows = torch.zeros(ls.shape[:-1], dtype=torch.float64, device=ls.device)
        if r > 0:
            rows = rows + r * kl_terms(lt, ls)
        if r < 1:
            rows = rows + (1 - r) * kl_terms(ls, lt)
        return rows
    if beta == 0:
        return kl_terms(lt, ls)
    if beta == 1:
        return kl_terms(ls, lt)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    return beta * kl_terms(lt, lm) + (1 - beta) * kl_terms(ls, lm)


def _dtype_as_given(student, teacher, *, temperature=1.0, beta=0.0, forward_weight=None):
    rows = divergence_rows(student, teacher, temperature=temperature, beta=beta,
                           forward_weight=forward_weight)
    return rows.to(torch.promote_types(student.dtype, teacher.dtype))


def _reduce(rows, keep, reduction):
    rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / keep.sum().clamp(min=1)


def _kept(shape, device, mask, labels, ignore_index):
    """Rows that count: mask True (or no mask) and label not ``ignore_index``."""
    mask_ok = torch.ones(shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
    return mask_ok if labels is None else mask_ok & (labels != ignore_index)


def jsd(student, teacher, *, beta=0.5, temperature=1.0, reduction="batchmean", mask=None,
        labels=None, ignore_index=-100, scale_by_t2=True, forward_weight=None):
    """``cex_kernels.jsd`` (``forward_weight``: the symmetric KL instead): kept rows'
    divergences, times T² when ``scale_by_t2``, reduced ("batchmean": over kept rows)."""
    rows = _dtype_as_given(student, teacher, temperature=temperature, beta=beta,
                           forward_weight=forward_weight)
    if scale_by_t2:
        rows = rows * temperature ** 2
    return _reduce(rows, _kept(rows.shape, rows.device, mask, labels, ignore_index), reduction)


def softmax_kl(student, teacher, *, direction="forward", forward_weight=None, **kwargs):
    """``cex_kernels.softmax_kl``: forward KL(q || p), reverse KL(p || q), symmetric
    r·KL(q || p) + (1 - r)·KL(p || q) with r = ``forward_weight`` (default 0.5)."""
    if direction == "symmetric":
        return jsd(student, teacher, forward_weight=0.5 if forward_weight is None
                   else forward_weight, **kwargs)
    return jsd(student, teacher, beta=0.0 if direction == "forward" else 1.0, **kwargs)


def softmax_kl_rows(student, teacher, row_weight, inv_temperature, beta, symmetric,
                    grad_student, grad_teacher):
    """The row kernels' contract (``ops/_divergence.py``) from autograd on the float64
    divergence: ``row_loss = w·L`` and ``grad = w·dL/d logits`` (0 where w = 0)."""
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_()
    options = dict(forward_weight=1.0 - beta) if symmetric and beta > 0 else dict(beta=beta)
    rows = divergence_rows(s, t, temperature=1.0 / inv_temperature, **options)
    w = row_weight.double()
    kept = w != 0
    weighted = torch.where(kept, w * rows, torch.zeros((), dtype=torch.float64))
    g_s, g_t = torch.autograd.grad(weighted.sum(), (s, t))
    grads = [g if want else g.new_empty((0,))
             for g, want in ((g_s, grad_student), (g_t, grad_teacher))]
    return (weighted.detach(), *grads)


def projected_mse(student, teacher, projection, reduction="mean"):
    """``F.mse_loss(student, teacher @ projection)``; "none": each row's sum of squares."""
    err = (student - teacher @ projection) ** 2
    if reduction == "none":
        return err.sum(-1)
    return err.sum() if reduction == "sum" else err.mean()


def linear_kl(student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None,
              teacher_weight=None, student_bias=None, teacher_bias=None, temperature=1.0,
              direction="forward", beta=None, reduction="batchmean", mask=None, labels=None,
              ignore_index=-100, hard_label_weight=0.0, soft_label_weight=1.0,
              scale_by_t2=True, return_parts=False):
    """``cex_kernels.linear_kl`` with the logits built in full: ``soft_label_weight`` times
    the divergence (teacher constant) plus ``hard_label_weight`` times the cross-entropy
    of kept rows, each reduced the same way."""
    logits = F.linear(student_hidden, student_weight, student_bias)
    if teacher_logits is None:
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    kw = dict(temperature=temperature, reduction=reduction, mask=mask, labels=labels,
              ignore_index=ignore_index, scale_by_t2=scale_by_t2)
    teacher_logits = teacher_logits.detach()
    kd = (jsd(logits, teacher_logits, beta=beta, **kw) if beta is not None
          else softmax_kl(logits, teacher_logits, direction=direction, **kw))
    ce = torch.zeros_like(kd)
    if labels is not None and (hard_label_weight > 0 or return_parts):
        keep = _kept(logits.shape[:-1], logits.device, mask, labels, ignore_index)
        log_p = F.log_softmax(logits, dim=-1)
        picked = log_p.gather(-1, torch.where(keep, labels, 0)[..., None].long())[..., 0]
        ce = _reduce(-picked, keep, reduction)
    loss = soft_label_weight * kd + hard_label_weight * ce
    return (loss, kd, ce) if return_parts else loss
