"""Distillation from a sparse teacher (a cache's k ids per token): three estimators of the
forward KL ``T² · KL(p || s)``, ``p = softmax(z_t / T)``, ``s = softmax(z_s / T)`` (the student
always keeps its full vocabulary), and the sampler that makes the third one's cache.

``renormalized`` (``TOP_K_LOSSES[0]``, the default): the teacher restricted to its k cached
    ids and renormalized, ``p̃_i = p_i / Σ_top p``, through the fused ``softmax_kl``
    (``(values, indices)`` pair). Bias: the teacher's tail mass ``1 - Σ_top p`` is dropped
    and its head inflated by ``1 / Σ_top p``; the gradient ``s_j`` on every tail logit
    pushes the student's tail to zero (over-confident, miscalibrated students: Anshumann
    et al. 2025). Exact for k = V. Over the stored support it can be re-tempered to any
    training temperature (see :func:`kd_loss_sum_top_k`).
``tail``: the k ids plus one "tail" bucket holding the rest, ``p_tail = 1 - Σ_top p`` and
    ``s_tail = Σ_{j ∉ top} s_j`` (a log-sum-exp over the other logits):
    ``Σ_top p_i log(p_i / s_i) + p_tail log(p_tail / s_tail)``, the KL between the
    (k+1)-bucket coarsenings. Bias: the tail's total mass is matched but not its shape; by
    the data-processing inequality the value is a lower bound on the full KL, equal when
    k = V or the student's tail is proportional to the teacher's. The gradient on a tail
    logit is ``s_j (1 - p_tail / s_tail) / T``. Needs log-probabilities normalized over the
    full vocabulary at the training temperature (the cache's).
``sampled`` (Random-Sampling KD, "Sparse Logit Sampling", Anshumann et al. 2025): per token
    ``rounds`` ids drawn with replacement from a proposal ``q ∝ p^(1/τ)`` (τ = 1: the teacher
    itself), kept once each with the importance weight ``w_i = c_i p_i / (rounds · q_i)``
    (``c_i`` draws). ``E[w_i] = p_i`` for every id, so the estimate
    ``Σ_i w_i (log p_i - log s_i)`` and its gradient ``Σ_i w_i (s - e_i) / T`` equal the full
    KL and its gradient in expectation: unbiased, with a variance that falls as 1/rounds.
    With τ = 1 the weights are ``c_i / rounds`` and sum to 1 per token; with τ ≠ 1 they
    sum to 1 only in expectation.

These eager losses hold the student's ``(N, V)`` log-softmax (the renormalized one uses the
fused kernel). Rows where ``mask`` is False are left out. All return sums over kept rows.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

TOP_K_LOSSES = ("renormalized", "tail")  # for a top-k cache; a sampled cache: "sampled"


def _rows(student: Tensor, mask: Optional[Tensor], *tensors: Tensor):
    """Kept rows, flattened to 2-D."""
    if mask is not None:
        return (student[mask],) + tuple(t[mask] for t in tensors)
    return (student.reshape(-1, student.shape[-1]),) + tuple(
        t.reshape(-1, t.shape[-1]) for t in tensors)


def renormalized_kl_sum(student_logits: Tensor, logprobs: Tensor, indices: Tensor, *,
                        temperature: float, cache_temperature: float,
                        mask: Optional[Tensor] = None, vocab_size: Optional[int] = None,
                        backend: str = "auto") -> Tensor:
    """``T² Σ_rows KL(p̃ || s)`` with ``p̃`` the teacher renormalized over its cached ids.

    ``logprobs = log_softmax(z_t / T_c)`` at ``indices`` (T_c: ``cache_temperature``);
    ``logprobs · T_c`` equals ``z_t`` up to a per-row constant, so ``softmax_kl`` at the
    training temperature T gives ``softmax(z_t / T)`` renormalized over those ids, for any T."""
    from cex_kernels.distill._losses import softmax_kl
    values = (logprobs.float() * cache_temperature).to(student_logits.dtype)
    return softmax_kl(student_logits, (values, indices), temperature=temperature,
                      reduction="sum", mask=mask, vocab_size=vocab_size,
                      backend=backend).float()


def tail_kl_sum(student_logits: Tensor, logprobs: Tensor, indices: Tensor, *,
                temperature: float, mask: Optional[Tensor] = None,
                vocab_size: Optional[int] = None) -> Tensor:
    """``T² Σ_rows [Σ_top p_i log(p_i/s_i) + p_tail log(p_tail/s_tail)]`` (module docstring);
    ``logprobs`` are the teacher's log-probabilities at ``temperature``; entries of -inf are
    padding (not part of the top set)."""
    z = student_logits if vocab_size is None else student_logits[..., :vocab_size]
    z, lp, idx = _rows(z, mask, logprobs, indices)
    log_s = F.log_softmax(z.float() / temperature, dim=-1)
    lp = lp.float()
    real = torch.isfinite(lp)
    idx = idx.long()
    p = torch.where(real, lp.exp(), torch.zeros_like(lp))
    head = torch.where(real, p * (lp - log_s.gather(-1, idx)), torch.zeros_like(lp)).sum(-1)
    # The student's tail: every logit not among the row's real cached ids.
    in_top = torch.zeros_like(log_s).scatter_add_(-1, idx, real.to(log_s.dtype)) > 0
    empty = in_top.all(-1, keepdim=True)  # k = V: no tail (a dummy keeps logsumexp finite)
    log_s_tail = log_s.masked_fill(in_top & ~empty, float("-inf")).logsumexp(-1)
    p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    tail = torch.where((p_tail > 0) & ~empty[:, 0],
                       p_tail * (p_tail.clamp_min(1e-30).log() - log_s_tail),
                       torch.zeros_like(p_tail))
    return (head + tail).sum() * temperature ** 2


def sampled_kl_sum(student_logits: Tensor, logprobs: Tensor, indices: Tensor, weights: Tensor,
                   *, temperature: float, mask: Optional[Tensor] = None,
                   vocab_size: Optional[int] = None) -> Tensor:
    """``T² Σ_rows Σ_i w_i (log p_i - log s_i)``: the sampled (unbiased) estimate of the KL."""
    z = student_logits if vocab_size is None else student_logits[..., :vocab_size]
    z, lp, idx, w = _rows(z, mask, logprobs, indices, weights)
    log_s = F.log_softmax(z.float() / temperature, dim=-1)
    w = w.float()
    terms = w * (lp.float() - log_s.gather(-1, idx.long()))
    return torch.where(w > 0, terms, torch.zeros_like(terms)).sum() * temperature ** 2


@torch.no_grad()
def sample_sparse_logits(logprobs: Tensor, rounds: int, *, proposal_temperature: float = 1.0,
                         generator: Optional[torch.Generator] = None
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    """Random-Sampling KD's sparse targets from full log-probabilities ``(N, V)``.

    Draws ``rounds`` ids per row with replacement from ``q ∝ p^(1/τ)``; returns
    ``(logprobs (N, r), indices (N, r) int64, weights (N, r) float32)``, ``r = min(rounds,
    V)``, each id once, most drawn first; unused slots have weight 0 and log-prob -inf."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if not proposal_temperature > 0:
        raise ValueError(f"proposal_temperature must be > 0, got {proposal_temperature!r}")
    lp = logprobs.float()
    log_q = F.log_softmax(lp / proposal_temperature, dim=-1)
    draws = torch.multinomial(log_q.exp(), rounds, replacement=True, generator=generator)
    counts = torch.zeros_like(lp).scatter_add_(-1, draws, torch.ones_like(draws, dtype=lp.dtype))
    r = min(rounds, lp.shape[-1])
    c, idx = counts.topk(r, dim=-1)
    drawn = c > 0
    weights = c / rounds if proposal_temperature == 1.0 else \
        c * (lp.gather(-1, idx) - log_q.gather(-1, idx)).exp() / rounds  # c · p / (N q)
    weights = torch.where(drawn, weights, torch.zeros_like(weights))
    values = torch.where(drawn, lp.gather(-1, idx), torch.full_like(weights, float("-inf")))
    return values, idx, weights
