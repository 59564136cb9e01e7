"""torchtune's KD loss (``ForwardKLWithChunkedOutputLoss`` + ``CEWithChunkedOutputLoss``,
combined with ``kd_ratio`` as its recipe does) against :class:`LinearForwardKLLoss`: equal
gradients, and values equal up to torchtune's teacher-entropy term.

torchtune 0.6.1 does not import here (it needs ``torchao`` and pins ``torchdata==0.11.0``):
its two loss classes are then replaced by their formulas, copied below from
``torchtune/modules/loss/kd_losses.py`` and ``ce_chunked_output_loss.py`` (0.6.1); when
torchtune imports, its own classes are used and the copies are checked against them too.
"""
import pytest
import torch
import torch.nn.functional as F

from cex_kernels.integrations import LinearForwardKLLoss

B, S, D, V, CHUNKS, IGNORE = 3, 8, 16, 40, 4, -100


def torchtune_forward_kl(student_chunks, teacher_chunks, labels):
    """``ForwardKLWithChunkedOutputLoss`` (torchtune 0.6.1): ``-Σ p_t log p_s`` over kept
    tokens (student ``-inf`` entries masked), summed chunk by chunk, / kept tokens."""
    mask = (labels != IGNORE).int()
    total = 0.0
    for s, t, lab in zip(student_chunks, teacher_chunks, labels.chunk(len(student_chunks), dim=1)):
        s, t, lab = s.reshape(-1, s.size(-1)), t.reshape(-1, t.size(-1)), lab.reshape(-1)
        teacher_prob = F.softmax(t, dim=-1, dtype=torch.float32)
        inf_mask = torch.isinf(s)
        student_logprob = F.log_softmax(s, dim=-1, dtype=torch.float32)
        prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
        x = torch.sum(prod_probs, dim=-1).view(-1)
        total = total - torch.sum(x * (lab != IGNORE).int().view(-1), dim=0)
    return total / mask.sum()


def torchtune_ce(student_chunks, labels):
    """``CEWithChunkedOutputLoss`` (torchtune 0.6.1): summed CE over chunks / kept tokens."""
    total = 0.0
    for s, lab in zip(student_chunks, labels.chunk(len(student_chunks), dim=1)):
        total = total + F.cross_entropy(s.reshape(-1, s.size(-1)).float(), lab.reshape(-1),
                                        ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum()


def torchtune_losses():
    """torchtune's own classes when it imports, else None."""
    try:
        from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss
    except Exception:  # ImportError, or torchao/torchdata failing to import against this torch
        return None
    return ForwardKLWithChunkedOutputLoss(CHUNKS, IGNORE), CEWithChunkedOutputLoss(CHUNKS, IGNORE)


@pytest.mark.parametrize("kd_ratio", [0.5, 1.0])
@pytest.mark.parametrize("teacher_as", ["logits", "hidden"])
def test_linear_kl_replaces_torchtune_kd_loss(kd_ratio, teacher_as):
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    w0 = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    h_t = torch.randn(B, S, 2 * D, generator=g, dtype=torch.float64)
    w_t = torch.randn(V, 2 * D, generator=g, dtype=torch.float64) / D ** 0.5
    teacher_logits = h_t @ w_t.T
    labels = torch.randint(0, V, (B, S), generator=g)
    labels = torch.hstack((labels[..., 1:], torch.full((B, 1), IGNORE)))  # the recipe's shift
    labels[1, :2] = IGNORE

    # torchtune: chunked logits, as model.chunked_output / teacher_model.chunked_output
    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    s_chunks = [c @ w.T for c in h.chunk(CHUNKS, dim=1)]
    t_chunks = list(teacher_logits.chunk(CHUNKS, dim=1))
    kd_tt, ce_tt = torchtune_forward_kl(s_chunks, t_chunks, labels), torchtune_ce(s_chunks, labels)
    loss_tt = (1 - kd_ratio) * ce_tt + kd_ratio * kd_tt
    grads_tt = torch.autograd.grad(loss_tt, (h, w))
    own = torchtune_losses()
    if own is not None:
        assert own[0](s_chunks, t_chunks, labels).item() == pytest.approx(kd_tt.item(), rel=1e-6)
        assert own[1](s_chunks, labels).item() == pytest.approx(ce_tt.item(), rel=1e-6)

    # ours: hidden states and weights, no logits
    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    teacher = {"teacher_logits": teacher_logits} if teacher_as == "logits" else \
        {"teacher_hidden": h_t, "teacher_weight": w_t}
    loss, kd, ce = LinearForwardKLLoss(kd_ratio=kd_ratio)(h, w, labels, **teacher)
    grads = torch.autograd.grad(loss, (h, w))

    kept = labels != IGNORE
    p_t = F.softmax(teacher_logits[kept], -1)
    entropy = -(p_t * p_t.log()).sum(-1).mean()  # torchtune's KD term minus KL(p_t || p_s)
    # torchtune computes both losses in float32 (softmax dtype, .float()): fp32 tolerances
    assert kd.item() + entropy.item() == pytest.approx(kd_tt.item(), rel=1e-6)
    assert ce.item() == pytest.approx(ce_tt.item(), rel=1e-6)
    assert loss.item() + kd_ratio * entropy.item() == pytest.approx(loss_tt.item(), rel=1e-6)
    assert abs(entropy.item()) > 1.0  # the term is there: the two are not simply equal
    for a, b in zip(grads, grads_tt):  # the entropy is a constant: equal gradients
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
