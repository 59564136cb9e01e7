"""The sparse-teacher KL estimators (cex_kernels.distill.top_k) against float64 math written
here: values and student gradients of the renormalized, tail and sampled losses, and the
sampled estimator's unbiasedness."""

import pytest
import torch

from cex_kernels.distill import top_k

N, V, K, T = 6, 24, 5, 1.7


def logits(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(dtype)


def teacher_top_k(z_t, k=K, temperature=T):
    lp = torch.log_softmax(z_t.double() / temperature, -1)
    return lp.topk(k, -1)


def grad_of(fn, z):
    z = z.clone().requires_grad_(True)
    value = fn(z)
    value.backward()
    return value.detach().double(), z.grad.double()


def oracle(fn, z_s):
    return grad_of(fn, z_s.double())


MASK = torch.tensor([True, True, False, True, True, True])


def test_renormalized_matches_float64_and_re_tempers_over_the_support():
    """Teacher cached at T_c = 1, trained at T: softmax(z_t / T) renormalized over the k ids."""
    z_s, z_t = logits(0), logits(1)
    lp1, idx = teacher_top_k(z_t, temperature=1.0)

    def want(z):
        q = torch.softmax(z_t.double().gather(-1, idx) / T, -1)  # the teacher at T, top-k only
        log_s = torch.log_softmax(z / T, -1).gather(-1, idx)
        rows = (q * (q.log() - log_s)).sum(-1)
        return (rows * (T * T))[MASK].sum()

    def got(z):
        return top_k.renormalized_kl_sum(z, lp1.float(), idx, temperature=T,
                                         cache_temperature=1.0, mask=MASK, backend="reference")
    v, g = grad_of(got, z_s)
    v64, g64 = oracle(want, z_s)
    assert v.item() == pytest.approx(v64.item(), rel=1e-5)
    torch.testing.assert_close(g, g64, rtol=1e-5, atol=1e-6)
    assert g[~MASK].abs().max() == 0


@pytest.mark.parametrize("k", [K, V])
def test_tail_bucket_matches_float64_and_is_the_full_kl_when_k_is_v(k):
    z_s, z_t = logits(2), logits(3)
    lp, idx = teacher_top_k(z_t, k)
    p_full = torch.softmax(z_t.double() / T, -1)

    def want(z):
        log_s = torch.log_softmax(z / T, -1)
        top = torch.zeros(N, V, dtype=torch.bool).scatter_(-1, idx, True)
        p = lp.exp()
        head = (p * (lp - log_s.gather(-1, idx))).sum(-1)
        p_tail = 1 - p.sum(-1)
        s_tail = torch.where(top, torch.zeros_like(log_s), log_s.exp()).sum(-1)
        tail = torch.where(p_tail > 1e-12, p_tail * (p_tail.clamp_min(1e-300).log()
                                                     - s_tail.clamp_min(1e-300).log()),
                           torch.zeros_like(p_tail))
        return ((head + tail) * T * T)[MASK].sum()

    def got(z):
        return top_k.tail_kl_sum(z, lp.float(), idx, temperature=T, mask=MASK)
    v, g = grad_of(got, logits(2))
    v64, g64 = oracle(want, z_s)
    assert v.item() == pytest.approx(v64.item(), rel=1e-5)
    torch.testing.assert_close(g, g64, rtol=1e-5, atol=1e-6)
    full = (p_full * (p_full.log() - torch.log_softmax(z_s.double() / T, -1))).sum(-1)
    full = (full * T * T)[MASK].sum().item()
    if k == V:
        assert v.item() == pytest.approx(full, rel=1e-5)
    else:  # the coarsened KL is a lower bound (data-processing inequality)
        assert v.item() < full


def test_tail_bucket_skips_padding_entries():
    """A row with -inf padding slots: those ids belong to the tail, not the top set."""
    z_s, z_t = logits(4), logits(5)
    lp, idx = teacher_top_k(z_t, K)
    padded_lp = torch.cat([lp[:, :3], torch.full((N, 2), float("-inf"), dtype=lp.dtype)], -1)
    padded_idx = torch.cat([idx[:, :3], idx[:, :1].expand(N, 2)], -1)  # pointing anywhere
    a = top_k.tail_kl_sum(z_s, padded_lp.float(), padded_idx, temperature=T)
    b = top_k.tail_kl_sum(z_s, lp[:, :3].float(), idx[:, :3], temperature=T)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_sampled_matches_float64():
    z_s, z_t = logits(6), logits(7)
    lp_full = torch.log_softmax(z_t.double() / T, -1)
    vals, idx, w = top_k.sample_sparse_logits(lp_full, 7, generator=torch.Generator().manual_seed(0))

    def want(z):
        log_s = torch.log_softmax(z / T, -1)
        # the weights as this test computes them: draws / rounds for q = p
        terms = torch.where(w > 0, w.double() * (lp_full.gather(-1, idx) - log_s.gather(-1, idx)),
                            torch.zeros(w.shape, dtype=torch.float64))
        return (terms.sum(-1) * T * T)[MASK].sum()

    def got(z):
        return top_k.sampled_kl_sum(z, vals.float(), idx, w, temperature=T, mask=MASK)
    v, g = grad_of(got, z_s)
    v64, g64 = oracle(want, z_s)
    assert v.item() == pytest.approx(v64.item(), rel=1e-5)
    torch.testing.assert_close(g, g64, rtol=1e-5, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(N))  # q = p: draws / rounds sum to one
    assert ((w * 7).round() == w * 7).all()


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_sampled_estimator_is_unbiased(tau):
    """Averaged over many draws (fixed seed), the weights approach p (E[w] = p for any
    proposal temperature) and the loss and gradient approach the full KL's; the renormalized
    top-k loss stays off by far more (its bias)."""
    z_s, z_t = logits(8), logits(9)
    lp_full = torch.log_softmax(z_t.double() / T, -1)
    p = lp_full.exp()
    g = torch.Generator().manual_seed(1)
    draws = 4000
    vals, idx, w = top_k.sample_sparse_logits(lp_full.repeat(draws, 1), 4,
                                              proposal_temperature=tau, generator=g)
    mean_w = torch.zeros(draws * N, V, dtype=torch.float64).scatter_add_(
        -1, idx, w.double()).reshape(draws, N, V).mean(0)
    # standard error of each mean weight is below 0.02 here; 5 sigma
    assert (mean_w - p).abs().max().item() < 0.05
    loss, grad = grad_of(lambda z: top_k.sampled_kl_sum(
        z.repeat(draws, 1), vals.float(), idx, w, temperature=T) / draws, z_s)
    full, full_grad = oracle(lambda z: ((p * (lp_full - torch.log_softmax(z / T, -1))).sum()
                                        * T * T), z_s)
    assert loss.item() == pytest.approx(full.item(), rel=0.05)
    assert (grad - full_grad).abs().max().item() < 0.03
    lp, top = teacher_top_k(z_t, 2)
    _, biased = grad_of(lambda z: top_k.renormalized_kl_sum(
        z, lp.float(), top, temperature=T, cache_temperature=T, backend="reference"), z_s)
    assert (biased - full_grad).abs().max().item() > 0.1


def test_sampler_rejects_bad_arguments():
    lp = torch.log_softmax(logits(0), -1)
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        top_k.sample_sparse_logits(lp, 0)
    with pytest.raises(ValueError, match="proposal_temperature must be > 0"):
        top_k.sample_sparse_logits(lp, 3, proposal_temperature=0.0)
