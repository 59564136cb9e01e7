"""The tests' float64 oracle for the divergences, written from the math (never
``cex_kernels.reference``, which is also a backend under test). One place, so the test
files that check kernels against it agree on what "correct" means.

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
