"""linear_kl with a top-k teacher ``(values, indices)`` against a float64 oracle written here."""
import math

import pytest
import torch

import cex_kernels
from conftest import assert_close_to_reference, backend_cases, skip_unsupported, triton_device


def make(n=11, hidden=8, vocab=29, k=6, dtype=torch.float32, seed=0, pad=True, lead=None):
    """Student hidden/weight/bias and a top-k teacher over distinct random indices; with
    ``pad`` some rows end in -inf padding (one pad points at a real entry's index)."""
    gen = torch.Generator().manual_seed(seed)
    lead = lead or (n,)
    rows = math.prod(lead)
    h = torch.randn(*lead, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.1
    idx = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(rows)])
    val = torch.randn(rows, k, generator=gen, dtype=torch.float64) * 2.0
    if pad:
        val[::3, -2:] = -math.inf
        idx[::3, -1] = idx[::3, 0]  # a pad at a real entry's index: contributes nothing
    idx, val = idx.reshape(*lead, k), val.reshape(*lead, k)
    cast = (lambda x: x.to(dtype))
    return cast(h), cast(w), cast(b), (cast(val), idx)


def oracle(h, w, b, top_k, temperature, direction, forward_weight=0.5, mask=None,
           reduction="batchmean"):
    """float64: loss (T² scaled) by direct sums over the support, and autograd grads of h, w, b."""
    h, w, b = (x.detach().double().requires_grad_() for x in (h, w, b))
    values, indices = top_k[0].double(), top_k[1]
    z = (h @ w.T + b) / temperature
    log_p = z - torch.logsumexp(z, -1, keepdim=True)
    real = values > -math.inf
    tv = torch.where(real, values / temperature, -math.inf)
    log_q_k = tv - torch.logsumexp(tv, -1, keepdim=True)  # over the given entries
    q_k = torch.where(real, log_q_k.exp(), 0.0)
    log_p_k = log_p.gather(-1, indices)
    fwd = torch.where(real, q_k * (torch.where(real, log_q_k, 0.0) - log_p_k), 0.0).sum(-1)
    # reverse: the student's mass off the support meets log q = -inf
    log_q = torch.full_like(log_p, -math.inf).scatter_reduce(
        -1, indices, torch.where(real, log_q_k, -math.inf), "amax")
    p = log_p.exp()
    rev = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    r = {"forward": 1.0, "reverse": 0.0, "symmetric": forward_weight}[direction]
    rows = (fwd if r == 1.0 else rev if r == 0.0 else r * fwd + (1 - r) * rev) * temperature ** 2
    keep = torch.ones(rows.shape, dtype=torch.bool) if mask is None else mask
    rows = torch.where(keep, rows, 0.0)
    loss = (rows if reduction == "none" else rows.sum() if reduction == "sum"
            else rows.sum() / keep.sum().clamp(min=1))
    return loss, (h, w, b)


def _run(h, w, b, top_k, backend, **kw):
    h, w, b = (x.clone().requires_grad_() for x in (h, w, b))
    loss = cex_kernels.linear_kl(h, w, top_k, student_bias=b, backend=backend, **kw)
    return loss, (h, w, b)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_forward_kl_loss_and_gradients(device, backend, dtype, reduction):
    skip_unsupported(device, backend, dtype)
    h, w, b, top_k = make(dtype=dtype)
    mask = torch.rand(11, generator=torch.Generator().manual_seed(3)) > 0.2
    # several chunks (of unequal sizes: 11 rows)
    loss, leaves = _run(h, w, b, top_k, backend, temperature=1.7, reduction=reduction,
                        mask=mask, chunk_bytes=4 * 29 * 4)
    want, ref = oracle(h, w, b, top_k, 1.7, "forward", mask=mask, reduction=reduction)
    assert_close_to_reference(loss, want, dtype, f"{backend} loss")
    up = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(loss, leaves, up.to(dtype))
    expected = torch.autograd.grad(want, ref, up)
    for name, g, e in zip("hwb", got, expected):
        assert_close_to_reference(g, e, dtype, f"{backend} grad {name}")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_reverse_and_symmetric_are_inf_with_mass_outside_the_k(device, backend):
    h, w, b, top_k = make(pad=False)
    for direction in ("reverse", "symmetric"):
        loss = cex_kernels.linear_kl(h, w, top_k, student_bias=b, direction=direction,
                                     backend=backend, reduction="none")
        assert torch.isinf(loss).all() and (loss > 0).all(), direction


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("direction", ["reverse", "symmetric"])
def test_reverse_and_symmetric_when_the_k_cover_the_vocabulary(device, backend, direction):
    """k = V (indices permuted, plus -inf padding): finite and equal to the oracle."""
    skip_unsupported(device, backend, torch.float64)
    h, w, b, (val, idx) = make(vocab=9, k=9, pad=False, dtype=torch.float64)
    val = torch.cat([val, torch.full((11, 2), -math.inf, dtype=val.dtype)], -1)
    idx = torch.cat([idx, idx[:, :2]], -1)  # the pads repeat real indices: allowed
    loss, leaves = _run(h, w, b, (val, idx), backend, direction=direction, temperature=0.8,
                        chunk_bytes=3 * 9 * 8)
    want, ref = oracle(h, w, b, (val, idx), 0.8, direction)
    assert torch.isfinite(loss)
    assert_close_to_reference(loss, want, torch.float64, f"{direction} loss")
    for name, g, e in zip("hwb", torch.autograd.grad(loss, leaves), torch.autograd.grad(want, ref)):
        assert_close_to_reference(g, e, torch.float64, f"{direction} grad {name}")


def test_hard_labels_parts_and_leading_dims():
    h, w, b, top_k = make(lead=(3, 4), dtype=torch.float64)
    labels = torch.randint(0, 29, (3, 4), generator=torch.Generator().manual_seed(2))
    labels[0, 1] = -100
    loss, kd, ce = cex_kernels.linear_kl(h, w, top_k, student_bias=b, labels=labels,
                                         hard_label_weight=0.4, soft_label_weight=0.6,
                                         reduction="none", return_parts=True, backend="cpu")
    keep = labels != -100
    want_kd, _ = oracle(h.reshape(12, -1), w, b, (top_k[0].reshape(12, -1), top_k[1].reshape(12, -1)),
                        1.0, "forward", mask=keep.reshape(-1), reduction="none")
    z = h @ w.T + b
    want_ce = torch.where(keep, torch.nn.functional.cross_entropy(
        z.reshape(12, -1), labels.clamp(min=0).reshape(-1), reduction="none").reshape(3, 4), 0.0)
    assert loss.shape == (3, 4)
    assert_close_to_reference(kd, want_kd.reshape(3, 4), torch.float64, "kd")
    assert_close_to_reference(ce, want_ce, torch.float64, "ce")
    assert_close_to_reference(loss, 0.6 * want_kd.reshape(3, 4) + 0.4 * want_ce, torch.float64,
                              "loss")


def test_gradcheck_float64():
    h, w, b, top_k = make(n=5, hidden=3, vocab=7, k=3, dtype=torch.float64)
    h, w, b = (x.requires_grad_() for x in (h, w, b))
    assert torch.autograd.gradcheck(
        lambda h, w, b: cex_kernels.linear_kl(h, w, top_k, student_bias=b, temperature=1.3,
                                              backend="cpu", chunk_bytes=2 * 7 * 8), (h, w, b))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    h, w, b, top_k = make()
    h = h.requires_grad_()

    def step(h, w, values, indices):
        return cex_kernels.linear_kl(h, w, (values, indices), temperature=2.0,
                                     chunk_bytes=5 * 29 * 4)

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(h, w, *top_k)
    (grad,) = torch.autograd.grad(loss, h)
    want, (rh, _, _) = oracle(h, w, torch.zeros(29), top_k, 2.0, "forward")
    (want_grad,) = torch.autograd.grad(want, rh)
    assert_close_to_reference(loss, want, torch.float32, "compiled loss")
    assert_close_to_reference(grad, want_grad, torch.float32, "compiled grad")
    bad = top_k[1].clone()
    bad[2, 1] = bad[2, 0]  # a repeated real index: checked inside the op, so also compiled
    with pytest.raises(ValueError, match="more than once"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(h, w, top_k[0], bad)


def test_functorch_grad_runs_the_eager_formula():
    h, w, b, top_k = make(n=4, dtype=torch.float64)
    grad = torch.func.grad(lambda x: cex_kernels.linear_kl(x, w, top_k, student_bias=b))(h)
    want, (rh, _, _) = oracle(h, w, b, top_k, 1.0, "forward")
    assert_close_to_reference(grad, torch.autograd.grad(want, rh)[0], torch.float64, "func.grad")


def test_neither_full_logits_nor_a_dense_teacher_exist():
    """Peak extra memory follows chunk_bytes: the (N, V) student logits and the dense
    (N, V) teacher would each be 8 MiB here."""
    from cex_kernels.benchmarking.measure import peak_extra_memory
    n, hidden, vocab, k = 512, 32, 4096, 64
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, requires_grad=True)
    values, indices = torch.randn(n, vocab, generator=gen).topk(k, dim=-1)

    def step():
        cex_kernels.linear_kl(h, w, (values, indices), backend="cpu",
                              chunk_bytes=1 << 20).backward()
        h.grad = w.grad = None

    peak = peak_extra_memory(step, "cpu")
    grads = (n * hidden + vocab * hidden) * 4
    assert peak < grads + n * vocab * 4 / 4, peak


def test_errors():
    h, w, b, (val, idx) = make()
    bad = idx.clone()
    bad[4, 2] = bad[4, 0]
    with pytest.raises(ValueError, match="more than once"):
        cex_kernels.linear_kl(h, w, (val, bad))
    with pytest.raises(ValueError, match=r"\[0, 29\)"):
        cex_kernels.linear_kl(h, w, (val, idx + 29))
    with pytest.raises(ValueError, match="leading dims"):
        cex_kernels.linear_kl(h, w, (val[:5], idx[:5]))
    with pytest.raises(TypeError, match="int64/int32"):
        cex_kernels.linear_kl(h, w, (val, idx.float()))
    with pytest.raises(TypeError, match="float64"):
        cex_kernels.linear_kl(h, w, (val.double(), idx))
    with pytest.raises(ValueError, match="pair"):
        cex_kernels.linear_kl(h, w, (val, idx, idx))
    with pytest.raises(ValueError, match="not both"):
        cex_kernels.linear_kl(h, w, (val, idx), teacher_hidden=h, teacher_weight=w)


@pytest.mark.skipif(triton_device() is None, reason="needs Triton")
def test_tiled_refuses_a_top_k_teacher_naming_the_option():
    h, w, b, top_k = make()
    with pytest.raises(ValueError, match="algorithm='chunked'"):
        cex_kernels.linear_kl(h, w, top_k, backend="triton", algorithm="tiled")
