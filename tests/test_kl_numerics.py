"""Numerics of softmax_kl / jsd (every backend) and the tiled linear_kl, against a float64
oracle written here (not ``cex_kernels.reference``, which is one of the backends tested):

* NaN / +inf in a kept row: NaN loss and NaN in every entry of each gradient of that row,
  for every direction and beta; a dropped row stays exactly 0.
* fp32 accuracy within 10x of eager fp32 PyTorch for T in [1e-3, 1e3], with a constant
  offset of 1000, and finite (the oracle's) answers for logits near the float maximum.
* beta = 1e-46 (nonzero in double, 0 in fp32) is a JSD on every backend.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import cex_kernels
from conftest import backend_cases, CPU_PATHS, rerun_cpu_cases_on_path
from oracle import divergence_rows

# The Triton interpreter warns on the -inf - (-inf) and NaN arithmetic these inputs ask for.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

TRITON_CASES = [c for c in backend_cases() if c.values[1] == "triton"]


# --- the float64 oracle -----------------------------------------------------------------

def oracle_rows(s, t, temperature, beta):
    """Per-row divergence in float64 (``tests/oracle.py``)."""
    return divergence_rows(s, t, temperature=temperature, beta=beta)


def oracle(s, t, temperature, beta):
    """(rows x T², d sum(rows x T²) / ds, ... / dt) from float64 copies of the inputs."""
    s64 = s.detach().double().cpu().requires_grad_()
    t64 = t.detach().double().cpu().requires_grad_()
    rows = oracle_rows(s64, t64, temperature, beta) * temperature ** 2
    gs, gt = torch.autograd.grad(rows.sum(), (s64, t64))
    return rows.detach(), gs, gt


def run(backend, s, t, temperature, beta, **kw):
    """The public op (reduction="none", T² scaling) and its gradients for both inputs."""
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    if beta == 0 or beta == 1:
        rows = cex_kernels.softmax_kl(s, t, temperature=temperature, reduction="none",
                                      direction="forward" if beta == 0 else "reverse",
                                      backend=backend, **kw)
    else:
        rows = cex_kernels.jsd(s, t, beta=beta, temperature=temperature, reduction="none",
                               backend=backend, **kw)
    gs, gt = torch.autograd.grad(rows.sum(), (s, t))
    return rows.detach().cpu().double(), gs.cpu().double(), gt.cpu().double()


def rel_err(actual, expected):
    """Largest absolute error over the largest magnitude (the tensor's scale)."""
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max()).item()


def logits(n, V, seed, spread=3.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V, generator=gen, dtype=torch.float64) * spread
    t = torch.randn(n, V, generator=gen, dtype=torch.float64) * spread
    return s.float().to(device), t.float().to(device)


# --- NaN / inf rows ---------------------------------------------------------------------

BETAS = [0.0, 1.0, 0.1, 0.5, 0.9]
POISONS = [("student", math.nan), ("teacher", math.nan), ("student", math.inf),
           ("teacher", math.inf)]


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("where,value", POISONS, ids=lambda x: str(x))
def test_nan_or_inf_row_makes_loss_and_every_gradient_entry_nan(device, backend, beta, where,
                                                                value):
    s, t = logits(5, 24, seed=1, device=device)
    for r in (1, 3):  # q = 0 and p = 0 entries in the poisoned rows: they must turn NaN too
        t[r, :3] = -math.inf
        s[r, 20:] = -math.inf
        t[r, 20:] = -math.inf
    poisoned = s if where == "student" else t
    poisoned[1, 10] = value  # kept row
    poisoned[3, 5] = value   # dropped row: never read
    mask = torch.tensor([True, True, True, False, True], device=device)
    rows, gs, gt = run(backend, s, t, 2.0, beta, mask=mask)
    assert torch.isnan(rows[1]), rows
    assert torch.isnan(gs[1]).all(), f"student gradient of the NaN row: {gs[1]}"
    assert torch.isnan(gt[1]).all(), f"teacher gradient of the NaN row: {gt[1]}"
    assert rows[3] == 0 and (gs[3] == 0).all() and (gt[3] == 0).all(), "dropped row"
    ok = torch.tensor([0, 2, 4])
    want_rows, want_gs, want_gt = oracle(s[ok], t[ok], 2.0, beta)
    torch.testing.assert_close(rows[ok], want_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs[ok], want_gs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt[ok], want_gt, rtol=1e-5, atol=1e-6)


# --- fp32 accuracy against eager fp32 ---------------------------------------------------

TEMPERATURES = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3]
# 1e-7 of the compared tensor's scale: eager's error can be 0 on a lucky case.
FLOOR = 1e-7


def eager_fp32(s, t, temperature):
    """Plain PyTorch in fp32: the accuracy every backend is held to (within 10x)."""
    s = s.detach().cpu().float().requires_grad_()
    loss = F.kl_div(F.log_softmax(s / temperature, -1),
                    F.log_softmax(t.detach().cpu().float() / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature * temperature
    (g,) = torch.autograd.grad(loss, s)
    return loss.detach(), g


def assert_as_accurate_as_eager(backend, s, t, temperature):
    n = s.shape[0]
    want_rows, want_gs, _ = oracle(s, t, temperature, 0.0)
    want_loss, want_gs = want_rows.sum() / n, want_gs / n
    eager_loss, eager_g = eager_fp32(s, t, temperature)
    s_in = s.detach().clone().requires_grad_()
    loss = cex_kernels.softmax_kl(s_in, t, temperature=temperature, backend=backend)
    (g,) = torch.autograd.grad(loss, s_in)
    for what, ours, eager, want in (("loss", loss, eager_loss, want_loss),
                                    ("student gradient", g, eager_g, want_gs)):
        err, bar = rel_err(ours, want), 10 * rel_err(eager, want) + FLOOR
        assert err <= bar, f"{what} at T={temperature}: relative error {err:.3g} > {bar:.3g}"


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n,V", [(8, 64), (1, 32000)], ids=["V64", "V32000"])
def test_fp32_accuracy_within_10x_of_eager(device, backend, temperature, n, V):
    s, t = logits(n, V, seed=2, device=device)
    assert_as_accurate_as_eager(backend, s, t, temperature)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("n,V", [(8, 64), (1, 32000)], ids=["V64", "V32000"])
def test_constant_offset_of_1000_loses_nothing(device, backend, n, V):
    """A teacher close to the student (a small KL) shows any cancellation of the scaled
    offset (1000 / T) between the two log-normalizers."""
    s, noise = logits(n, V, seed=3, spread=1.0, device=device)
    assert_as_accurate_as_eager(backend, s + 1000, s + 0.1 * noise + 1000, 3.0)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_logits_near_float_max_give_the_finite_answer(device, backend, beta):
    """Logits a few ulps (2^104 each) below 3e38 at T = 0.5: x / T overflows, x - max does
    not. The softmaxes are (near) one-hot with ties, so the answer is large but finite."""
    top = float(torch.tensor(3e38, dtype=torch.float32))
    ulps = torch.tensor([[0, 0, 1, 2, 5, 3, 1, 4],
                         [2, 0, 0, 1, 1, 3, 0, 2]], dtype=torch.float64)
    s = (top - ulps * 2.0 ** 104).float().to(device)
    t = (top - ulps.flip(-1) * 2.0 ** 104).float().to(device)
    assert torch.equal(s.double().cpu(), top - ulps * 2.0 ** 104)  # exact in fp32
    rows, gs, gt = run(backend, s, t, 0.5, beta)
    want_rows, want_gs, want_gt = oracle(s, t, 0.5, beta)
    assert torch.isfinite(want_rows).all() and torch.isfinite(rows).all(), rows
    torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, want_gs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt, want_gt, rtol=1e-5, atol=1e-4 * want_gt.abs().max().item())


@pytest.mark.parametrize("device,backend", backend_cases())
def test_beta_that_is_zero_in_fp32_is_still_a_jsd(device, backend):
    """beta = 1e-46: the divergence is about beta KL(q || p), 0 in fp32, not KL(q || p)."""
    beta = 1e-46
    s, t = logits(4, 40, seed=4, device=device)
    rows, gs, gt = run(backend, s, t, 1.5, beta)
    want_rows, want_gs, want_gt = oracle(s, t, 1.5, beta)
    assert want_rows.abs().max() < 1e-44  # the oracle: a JSD, nearly 0
    torch.testing.assert_close(rows, want_rows, rtol=0, atol=1e-38)
    torch.testing.assert_close(gs, want_gs, rtol=0, atol=1e-38)
    torch.testing.assert_close(gt, want_gt, rtol=0, atol=1e-38)


# --- the tiled linear_kl --------------------------------------------------------------

def linear_case(seed, offset=0.0, noise=1.0):
    """Hidden states, weight, bias (+ offset) and teacher logits = student logits + noise."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(40, 16, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(40, generator=gen, dtype=torch.float64) * 0.1 + offset
    t = (h @ w.T + b) + noise * torch.randn(6, 40, generator=gen, dtype=torch.float64)
    return h.float(), w.float(), b.float(), t.float()


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("temperature,offset,noise", [
    (1e-3, 0.0, 1.0), (1e-2, 0.0, 1.0), (1.0, 0.0, 1.0), (100.0, 0.0, 1.0),
    (3.0, 1000.0, 0.3),  # a teacher near the student: a small KL shows any cancellation
], ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_tiled_linear_kl_accuracy_within_10x_of_eager(device, backend, temperature, offset,
                                                       noise, direction):
    h, w, b, t = linear_case(5, offset, noise)
    beta = 0.0 if direction == "forward" else 1.0

    def oracle_loss(hh, ww, bb, tt):
        return oracle_rows(F.linear(hh, ww, bb), tt, temperature, beta).mean() * temperature ** 2

    def eager_loss(hh, ww, bb, tt):
        ls = F.log_softmax(F.linear(hh, ww, bb) / temperature, -1)
        lt = F.log_softmax(tt / temperature, -1)
        inp, target = (ls, lt) if beta == 0 else (lt, ls)
        return F.kl_div(inp, target, log_target=True, reduction="batchmean") * temperature ** 2

    def tiled_loss(hh, ww, bb, tt):
        return cex_kernels.linear_kl(hh, ww, tt, student_bias=bb, temperature=temperature,
                                     direction=direction, algorithm="tiled", backend=backend)

    def value_and_grad(fn, dtype, on):
        hh = h.to(dtype=dtype, device=on).requires_grad_()
        loss = fn(hh, *(x.to(dtype=dtype, device=on) for x in (w, b, t)))
        (g,) = torch.autograd.grad(loss, hh)
        return loss.detach().cpu().double(), g.cpu().double()

    want_loss, want_g = value_and_grad(oracle_loss, torch.float64, "cpu")
    eager = value_and_grad(eager_loss, torch.float32, "cpu")
    ours = value_and_grad(tiled_loss, torch.float32, device)
    for what, a, e, want in (("loss", ours[0], eager[0], want_loss),
                             ("hidden gradient", ours[1], eager[1], want_g)):
        # The floor, 1e-6: the fp32 GEMM's own rounding of the logits, which eager shares.
        err, bar = rel_err(a, want), 10 * rel_err(e, want) + 1e-6
        assert err <= bar, f"{what} at T={temperature}: relative error {err:.3g} > {bar:.3g}"


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_interpreter_bf16_dot_is_computed_in_fp32(device, backend):
    """Under the interpreter bf16 tl.dot is wrong (triton issue 11584): the launchers of
    projected_mse and the tiled linear_kl compute bf16 there in fp32, in the contract's
    dtypes."""
    gen = torch.Generator().manual_seed(6)
    s, tch = torch.randn(9, 24, generator=gen), torch.randn(9, 40, generator=gen)
    proj = torch.randn(40, 24, generator=gen) * 0.2
    s, tch, proj = (x.bfloat16().to(device) for x in (s, tch, proj))
    s.requires_grad_()
    loss = cex_kernels.projected_mse(s, tch, proj, backend=backend)
    (g,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().cpu().requires_grad_()
    want = F.mse_loss(s64, tch.double().cpu() @ proj.double().cpu())
    (want_g,) = torch.autograd.grad(want, s64)
    assert loss.dtype == torch.bfloat16 and g.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double().cpu(), want, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(g.double().cpu(), want_g, rtol=2e-2, atol=1e-3 * want_g.abs().max().item())

    h, w, b, t = (x.bfloat16().to(device) for x in linear_case(7))
    h.requires_grad_()
    loss = cex_kernels.linear_kl(h, w, t, student_bias=b, algorithm="tiled", backend=backend)
    (g,) = torch.autograd.grad(loss, h)
    h64 = h.detach().double().cpu().requires_grad_()
    want = oracle_rows(F.linear(h64, w.double().cpu(), b.double().cpu()), t.double().cpu(),
                       1.0, 0.0).mean()
    (want_g,) = torch.autograd.grad(want, h64)
    assert loss.dtype == torch.bfloat16 and g.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double().cpu(), want, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(g.double().cpu(), want_g, rtol=2e-2, atol=2e-2 * want_g.abs().max().item())


@pytest.mark.parametrize("path", sorted(CPU_PATHS))
def test_cpu_cases_on_other_cpu_paths(path):
    """The cpu cases above again on the portable (CEX_DISABLE_AVX2=1) and the AVX2
    (CEX_DISABLE_AVX512=1) paths; in-process they ran on the widest this CPU has."""
    rerun_cpu_cases_on_path(__file__, path)
