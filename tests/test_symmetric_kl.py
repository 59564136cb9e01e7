"""The symmetric KL, ``softmax_kl(direction="symmetric", forward_weight=r)``:
``r·KL(p_t || p_s) + (1-r)·KL(p_s || p_t)``, on every backend that runs here.

The oracle is float64 math written in this file (never ``cex_kernels.reference``, which is
also a backend): log-softmaxes, the two KLs with 0·log 0 = 0, and autograd through them for
the gradients and gradients of gradients.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cex_kernels
from conftest import (TOLERANCES, assert_close_to_reference, backend_cases,
                      CPU_PATHS, rerun_cpu_cases_on_path, skip_unsupported)
from oracle import divergence_rows

# The Triton interpreter warns on the -inf - (-inf) and NaN arithmetic some inputs ask for.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

CPU_BACKENDS = [c for c in backend_cases() if c.values[1] in ("reference", "cpu")]
R_VALUES = [0.0, 0.3, 0.5, 1.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# --- the float64 oracle ---------------------------------------------------------------------

def oracle_rows(s, t, r, temperature):
    """Per-row r KL(q || p) + (1 - r) KL(p || q) in float64 (``tests/oracle.py``)."""
    return divergence_rows(s, t, temperature=temperature, forward_weight=r)


def oracle_loss(s, t, r, temperature=1.0, keep=None, reduction="batchmean"):
    """The public op's value: rows x T², dropped rows 0, reduced."""
    rows = oracle_rows(s, t, r, temperature) * temperature ** 2
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros((), dtype=torch.float64))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (rows.numel() if keep is None else keep.sum().clamp(min=1))


def oracle(s, t, r, temperature=1.0, keep=None, reduction="batchmean", upstream=None):
    """(loss, d/ds, d/dt) of the oracle's loss (weighted by ``upstream`` for "none")."""
    s64 = s.detach().double().cpu().requires_grad_()
    t64 = t.detach().double().cpu().requires_grad_()
    loss = oracle_loss(s64, t64, r, temperature, keep, reduction)
    total = loss.sum() if upstream is None else (loss * upstream.double()).sum()
    gs, gt = torch.autograd.grad(total, (s64, t64))
    return loss.detach(), gs, gt


def symmetric(s, t, r, **kw):
    return cex_kernels.softmax_kl(s, t, direction="symmetric", forward_weight=r, **kw)


def make_logits(lead, V, dtype=torch.float32, seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * spread
    t = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * spread
    return s.to(dtype), t.to(dtype)


def run(backend, s, t, r, **kw):
    """(loss, d/ds, d/dt) of the public op, both inputs requiring grad."""
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = symmetric(s, t, r, backend=backend, **kw)
    gs, gt = torch.autograd.grad(loss.sum(), (s, t))
    return loss.detach(), gs, gt


def skip_unsupported_here(device, backend, dtype):
    """conftest's skips, but bf16 Triton runs: this kernel has no tl.dot."""
    if not (backend == "triton" and dtype == torch.bfloat16):
        skip_unsupported(device, backend, dtype)


# --- values and gradients against the oracle ------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", R_VALUES, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("temperature", [1.0, 2.5], ids=lambda x: f"T{x}")
def test_loss_and_both_gradients_match_the_oracle(device, backend, dtype, r, temperature):
    skip_unsupported_here(device, backend, dtype)
    s, t = make_logits((2, 3), 37, dtype, seed=int(10 * r + temperature))
    keep = torch.tensor([[True, False, True], [True, True, True]])
    loss, gs, gt = run(backend, s, t, r, temperature=temperature, mask=keep)
    want, want_s, want_t = oracle(s, t, r, temperature, keep)
    assert loss.dtype == dtype and gs.dtype == dtype and gt.dtype == dtype
    assert_close_to_reference(loss, want, dtype, f"loss r={r}")
    assert_close_to_reference(gs, want_s, dtype, f"student grad r={r}")
    assert_close_to_reference(gt, want_t, dtype, f"teacher grad r={r}")
    assert (gs[0, 1] == 0).all() and (gt[0, 1] == 0).all()  # the dropped row


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reductions_masks_and_labels(device, backend, reduction):
    s, t = make_logits((4, 5), 29, seed=3)
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(4)) > 0.3
    labels = torch.arange(20).reshape(4, 5) % 7 - 1  # label -1 drops a row too
    keep = mask & (labels != -1)
    upstream = torch.rand(4, 5, generator=torch.Generator().manual_seed(5)) + 0.5
    s_ = s.clone().requires_grad_()
    t_ = t.clone().requires_grad_()
    loss = symmetric(s_, t_, 0.3, temperature=2.0, reduction=reduction, mask=mask,
                     labels=labels, ignore_index=-1, backend=backend)
    weight = upstream if reduction == "none" else None
    gs, gt = torch.autograd.grad(loss if weight is None else (loss * weight).sum(), (s_, t_))
    want, want_s, want_t = oracle(s, t, 0.3, 2.0, keep, reduction, weight)
    assert loss.shape == want.shape
    assert_close_to_reference(loss, want, torch.float32, "loss")
    assert_close_to_reference(gs, want_s, torch.float32, "student grad")
    assert_close_to_reference(gt, want_t, torch.float32, "teacher grad")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_no_kept_row_gives_zero(device, backend):
    s, t = make_logits((3,), 11, seed=6)
    loss, gs, gt = run(backend, s, t, 0.3, mask=torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0 and (gs == 0).all() and (gt == 0).all()


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("r,direction", [(1.0, "forward"), (0.0, "reverse")])
def test_weights_one_and_zero_are_the_existing_directions(device, backend, r, direction):
    s, t = make_logits((5,), 23, seed=7)
    got = run(backend, s, t, r, temperature=1.5, reduction="none")
    s_ = s.clone().requires_grad_()
    t_ = t.clone().requires_grad_()
    loss = cex_kernels.softmax_kl(s_, t_, direction=direction, temperature=1.5,
                                  reduction="none", backend=backend)
    want = (loss.detach(), *torch.autograd.grad(loss.sum(), (s_, t_)))
    for name, a, b in zip(("loss", "student grad", "teacher grad"), got, want):
        assert torch.equal(a, b), name


def test_default_forward_weight_is_one_half():
    s, t = make_logits((4,), 9, seed=8)
    torch.testing.assert_close(cex_kernels.softmax_kl(s, t, direction="symmetric"),
                               symmetric(s, t, 0.5))


# --- non-finite inputs ----------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_cases())
def test_neg_inf_logits_where_both_have_no_mass(device, backend):
    """-inf at the same entries of student and teacher: 0 log 0 = 0, a finite answer."""
    s, t = make_logits((3,), 19, seed=9)
    s[:, 4:9] = float("-inf")
    t[:, 4:9] = float("-inf")
    s[1, 0] = t[1, 0] = float("-inf")
    loss, gs, gt = run(backend, s, t, 0.3, temperature=2.0, reduction="sum")
    want, want_s, want_t = oracle(s, t, 0.3, 2.0, reduction="sum")
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert_close_to_reference(loss, want, torch.float32, "loss")
    assert_close_to_reference(gs, want_s, torch.float32, "student grad")
    assert_close_to_reference(gt, want_t, torch.float32, "teacher grad")


def _student_mass_outside_the_teacher(backend, r, direction=None):
    """Rows 0 and 2 have teacher -inf where the student has mass; row 1 does not."""
    s, t = make_logits((3,), 17, seed=10)
    t[0, 3:6] = float("-inf")
    t[2, 0] = float("-inf")
    s_ = s.clone().requires_grad_()
    t_ = t.clone().requires_grad_()
    if direction is None:
        loss = symmetric(s_, t_, r, temperature=2.0, reduction="none", backend=backend)
    else:
        loss = cex_kernels.softmax_kl(s_, t_, direction=direction, temperature=2.0,
                                      reduction="none", backend=backend)
    return s, t, loss.detach(), *torch.autograd.grad(loss.sum(), (s_, t_))


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("r", [0.0, 0.3, 0.5], ids=lambda r: f"r{r}")
def test_teacher_neg_inf_under_student_mass_is_an_inf_loss(device, backend, r):
    """Reverse KL is +inf where q = 0 < p: the loss is inf (not NaN, legal), the teacher's
    gradient is finite (the oracle's), and the student's has the reverse KL's non-finite
    entries (NaN where q = 0, -inf where q > 0) on the rows concerned."""
    s, t, loss, gs, gt = _student_mass_outside_the_teacher(backend, r)
    assert loss[0].item() == float("inf") and loss[2].item() == float("inf")
    want, want_s, want_t = oracle(s[1:2], t[1:2], r, 2.0, reduction="none")
    assert_close_to_reference(loss[1:2], want, torch.float32, "finite row")
    assert_close_to_reference(gs[1:2], want_s, torch.float32, "finite row's student grad")
    assert torch.isfinite(gt).all()
    # the teacher's gradient, closed form: T (r q (lt - ls - F) + (1-r)(q - p)) (T² / T)
    ls = F.log_softmax(s.double() / 2.0, -1)
    lt = F.log_softmax(t.double() / 2.0, -1)
    p, q = ls.exp(), lt.exp()
    fwd = torch.where(q > 0, q * (lt - ls), torch.zeros(())).sum(-1, keepdim=True)
    d_t = r * torch.where(q > 0, q * (lt - ls - fwd), torch.zeros(())) + (1 - r) * (q - p)
    assert_close_to_reference(gt, 2.0 * d_t, torch.float32, "teacher grad")
    _, _, rev_loss, rev_gs, _ = _student_mass_outside_the_teacher(backend, 0.0, "reverse")
    assert torch.equal(torch.isinf(rev_loss), torch.isinf(loss))
    for row in (0, 2):
        assert torch.equal(torch.isnan(gs[row]), torch.isnan(rev_gs[row])), row
        assert torch.equal(torch.isneginf(gs[row]), torch.isneginf(rev_gs[row])), row


def test_inf_loss_rows_agree_across_backends():
    runs = {b: _student_mass_outside_the_teacher(b, 0.3)[2:]
            for b in [c.values[1] for c in backend_cases() if not c.marks]}
    first, *rest = runs.values()
    for name, other in zip(runs, rest):
        for a, b in zip(first, other):
            assert torch.equal(torch.isnan(a), torch.isnan(b)), name
            assert torch.equal(torch.isposinf(a), torch.isposinf(b)), name
            assert torch.equal(torch.isneginf(a), torch.isneginf(b)), name
            finite = torch.isfinite(a)
            torch.testing.assert_close(a[finite], b[finite], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("r", [0.0, 0.3, 1.0], ids=lambda r: f"r{r}")
def test_nan_row_is_nan_everywhere_and_a_dropped_nan_row_is_zero(device, backend, r):
    s, t = make_logits((4,), 21, seed=11)
    s[1, 5] = float("nan")  # kept row: NaN loss, every gradient entry NaN
    t[2, 7] = float("nan")  # dropped row: never read
    keep = torch.tensor([True, True, False, True])
    loss, gs, gt = run(backend, s, t, r, reduction="none", mask=keep)
    assert torch.isnan(loss[1]) and torch.isnan(gs[1]).all() and torch.isnan(gt[1]).all()
    assert loss[2].item() == 0.0 and (gs[2] == 0).all() and (gt[2] == 0).all()
    rows = [0, 3]
    want, want_s, want_t = oracle(s[rows], t[rows], r, reduction="none")
    assert_close_to_reference(loss[rows], want, torch.float32, "finite rows")
    assert_close_to_reference(gs[rows], want_s, torch.float32, "finite rows' student grad")
    assert_close_to_reference(gt[rows], want_t, torch.float32, "finite rows' teacher grad")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_large_offset_and_small_temperature(device, backend):
    """log-probs around the raw row max: a constant offset of 1000 and T = 0.05 lose
    nothing beyond fp32 rounding of the inputs."""
    s, t = make_logits((3,), 31, seed=12, spread=1.0)
    s, t = s + 1000.0, t - 1000.0
    for temperature in (1.0, 0.05):
        loss, gs, gt = run(backend, s, t, 0.3, temperature=temperature, reduction="sum")
        want, want_s, want_t = oracle(s, t, 0.3, temperature, reduction="sum")
        tol = dict(rtol=1e-4, atol=1e-5 * max(1.0, want.abs().item()))
        torch.testing.assert_close(loss.double(), want, **tol)
        torch.testing.assert_close(gs.double(), want_s, rtol=1e-4,
                                   atol=1e-5 * want_s.abs().max().item())
        torch.testing.assert_close(gt.double(), want_t, rtol=1e-4,
                                   atol=1e-5 * want_t.abs().max().item())


@pytest.mark.parametrize("path", sorted(CPU_PATHS))
def test_cpu_cases_on_other_cpu_paths(path):
    """The cpu cases above again on the portable (CEX_DISABLE_AVX2=1) and the AVX2
    (CEX_DISABLE_AVX512=1) paths; in-process they ran on the widest this CPU has."""
    rerun_cpu_cases_on_path(__file__, path)


# --- linear_kl --------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("r", [0.3, 1.0], ids=lambda r: f"r{r}")
def test_linear_kl_symmetric_matches_the_oracle(device, backend, r):
    gen = torch.Generator().manual_seed(13)
    h = torch.randn(2, 3, 8, generator=gen)
    w = torch.randn(19, 8, generator=gen) * 0.5
    b = torch.randn(19, generator=gen)
    t = torch.randn(2, 3, 19, generator=gen) * 2
    keep = torch.tensor([[True, False, True], [True, True, True]])
    params = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = cex_kernels.linear_kl(params[0], params[1], t, student_bias=params[2],
                                 direction="symmetric", forward_weight=r, temperature=2.0,
                                 mask=keep, backend=backend, chunk_bytes=2 * 19 * 4)
    grads = torch.autograd.grad(loss, params)
    wanted = [x.double().requires_grad_() for x in (h, w, b)]
    want = oracle_loss(F.linear(*wanted), t, r, 2.0, keep)
    want_grads = torch.autograd.grad(want, wanted)
    assert_close_to_reference(loss, want, torch.float32, "loss")
    for name, g, e in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert_close_to_reference(g, e, torch.float32, f"d {name}")
    module = cex_kernels.LinearKLLoss(direction="symmetric", forward_weight=r, temperature=2.0,
                                      backend=backend, chunk_bytes=2 * 19 * 4)
    torch.testing.assert_close(module(h, w, t, student_bias=b, mask=keep), loss.detach())


TRITON_HERE = [c for c in backend_cases() if c.values[1] == "triton"]


def _tiled_configs():
    if not TRITON_HERE or TRITON_HERE[0].marks:
        return []
    from cex_kernels.triton.linear_kl import GRAD_CONFIG, STATS_CONFIG
    key = ("fp32", False)  # one GPU block shape besides the interpreter's small one
    return [None, (STATS_CONFIG[key], GRAD_CONFIG[key])]


@pytest.mark.parametrize("device,backend", TRITON_HERE)
@pytest.mark.parametrize("configs", _tiled_configs(), ids=["interpreter", "gpu-fp32"])
def test_linear_kl_tiled_symmetric_matches_the_oracle(device, backend, configs):
    """The vocabulary-tiled kernels: both KLs from one statistics pass, the symmetric
    gradient in the gradient kernel; with labels, the hard-label term beside it."""
    gen = torch.Generator().manual_seed(21)
    n, hidden, vocab = 20, 24, 45
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.3
    b = torch.randn(vocab, generator=gen)
    t = torch.randn(n, vocab, generator=gen) * 2
    labels = torch.randint(0, vocab, (n,), generator=gen)
    keep = torch.rand(n, generator=gen) > 0.2
    if configs is None:
        params = [x.clone().requires_grad_() for x in (h, w, b)]
        loss = cex_kernels.linear_kl(params[0], params[1], t, student_bias=params[2],
                                     direction="symmetric", forward_weight=0.3, temperature=2.0,
                                     mask=keep, labels=labels, hard_label_weight=0.4,
                                     algorithm="tiled", backend=backend)
        grads = torch.autograd.grad(loss, params)
    else:
        from cex_kernels.triton.linear_kl import linear_kl_tiled
        kd_w = keep.float() * 4.0 / keep.sum()  # T² x batchmean divisor
        ce_w = keep.float() * 0.4 / keep.sum()
        rows, *grads = linear_kl_tiled(h, w, b, t, labels, kd_w, ce_w, 2.0, False, True,
                                       symmetric_beta=0.7, stats_config=configs[0],
                                       grad_config=configs[1])
        loss = rows.sum()
    wanted = [x.double().requires_grad_() for x in (h, w, b)]
    z = F.linear(*wanted)
    ce = F.cross_entropy(z, labels, reduction="none")
    want = oracle_loss(z, t, 0.3, 2.0, keep) + 0.4 * (ce * keep).sum() / keep.sum()
    want_grads = torch.autograd.grad(want, wanted)
    assert_close_to_reference(loss, want, torch.float32, "loss")
    for name, g, e in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert_close_to_reference(g, e, torch.float32, f"d {name}")


def test_linear_kl_tiled_refuses_the_jsd_still():
    h, w, t = torch.randn(3, 4), torch.randn(7, 4), torch.randn(3, 7)
    with pytest.raises(ValueError, match="generalized JSD"):
        cex_kernels.linear_kl(h, w, t, beta=0.5, algorithm="tiled", backend="triton")


# --- autograd machinery -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_float64(backend, reduction):
    s, t = make_logits((2, 3), 6, torch.float64, seed=14, spread=1.0)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.autograd.gradcheck(
        lambda a, b: symmetric(a, b, 0.3, temperature=1.7, reduction=reduction, mask=mask,
                               backend=backend),
        (s.requires_grad_(), t.requires_grad_()))


@pytest.mark.parametrize("device,backend", backend_cases())
def test_double_backward_matches_the_oracle(device, backend):
    """A gradient penalty d/dx |d loss/ds|^2 (both inputs) against the oracle's."""
    s, t = make_logits((3,), 13, seed=15, spread=1.0)

    def penalty(loss_fn, a, b):
        (g,) = torch.autograd.grad(loss_fn(a, b), a, create_graph=True)
        return (g ** 2).sum()

    a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
    got = torch.autograd.grad(
        penalty(lambda x, y: symmetric(x, y, 0.3, temperature=1.5, backend=backend), a, b),
        (a, b))
    a64, b64 = s.double().requires_grad_(), t.double().requires_grad_()
    want = torch.autograd.grad(
        penalty(lambda x, y: oracle_loss(x, y, 0.3, 1.5), a64, b64), (a64, b64))
    for name, g, e in zip(("student", "teacher"), got, want):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_torch_func_grad_runs_the_eager_formula(device, backend):
    s, t = make_logits((4,), 10, seed=16)
    got = torch.func.grad(lambda x: symmetric(x, t, 0.3, temperature=2.0, backend=backend))(s)
    _, want, _ = oracle(s, t, 0.3, 2.0)
    assert_close_to_reference(got, want, torch.float32, "torch.func.grad")


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    s, t = make_logits((4, 3), 19, seed=17)
    mask = torch.rand(4, 3, generator=torch.Generator().manual_seed(1)) > 0.3
    s.requires_grad_()
    t.requires_grad_()
    compiled = torch.compile(
        lambda a, b, keep: symmetric(a, b, 0.3, temperature=2.0, mask=keep, backend=backend) * 3,
        fullgraph=True, backend="aot_eager")
    loss = compiled(s, t, mask)
    gs, gt = torch.autograd.grad(loss, (s, t))
    want, want_s, want_t = oracle(s, t, 0.3, 2.0, mask)
    assert_close_to_reference(loss, 3 * want, torch.float32, "compiled loss")
    assert_close_to_reference(gs, 3 * want_s, torch.float32, "compiled student grad")
    assert_close_to_reference(gt, 3 * want_t, torch.float32, "compiled teacher grad")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_opcheck(device, backend):
    s, t = make_logits((6,), 13, seed=18)
    w = torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0, 1.0])
    for beta, reduction, gs, gt in ((0.7, "none", False, False), (0.5, "sum", True, False),
                                    (0.3, "none", True, True), (0.5, "sum", False, True)):
        args = (s.clone().requires_grad_(gs), t.clone().requires_grad_(gt), w, None, 2.0, beta,
                True, reduction, backend, gs, gt)
        torch.library.opcheck(torch.ops.cex.softmax_kl.default, args)
    if backend == "cpu":  # the linear op's schema carries the flag too
        h = torch.randn(6, 5, requires_grad=True)
        weight = torch.randn(13, 5)
        args = (h, weight, None, [t], w, None, None, None, 1.0, 0.0, 2.0, 0.6, True, "sum",
                True, False, "logits", "kl", backend, 4)
        torch.library.opcheck(torch.ops.cex.linear_loss_chunked.default, args)


def test_fp16_storage_scale_leaves_room_for_both_log_ratio_sides():
    from cex_kernels.ops.softmax_kl import _grad_bound
    assert _grad_bound(0.7, True, True, False) == 128.0
    assert _grad_bound(0.7, True, False, True) == 128.0
    assert _grad_bound(0.5, False, True, True) == 2.0  # the JSD
    # and fp16 gradients of a sharp pair survive a loss scale of 2**12
    s, t = make_logits((8,), 64, torch.float16, seed=19, spread=6.0)
    s_ = s.clone().requires_grad_()
    t_ = t.clone().requires_grad_()
    (symmetric(s_, t_, 0.3, backend="cpu") * 2.0 ** 12).backward()
    _, want_s, want_t = oracle(s, t, 0.3)
    for g, e in ((s_.grad, want_s), (t_.grad, want_t)):
        assert torch.isfinite(g).all()
        assert_close_to_reference(g.double() / 2.0 ** 12, e, torch.float16, "scaled fp16 grad")


# --- options ----------------------------------------------------------------------------------

def test_forward_weight_is_checked_everywhere():
    s, t = make_logits((4,), 6, seed=20)
    h, w = torch.randn(4, 3), torch.randn(6, 3)
    calls = [lambda **kw: cex_kernels.softmax_kl(s, t, **kw),
             lambda **kw: cex_kernels.linear_kl(h, w, t, **kw),
             lambda **kw: cex_kernels.DistillKLLoss(**kw),
             lambda **kw: cex_kernels.LinearKLLoss(**kw)]
    for call in calls:
        for direction in ("forward", "reverse"):
            with pytest.raises(ValueError, match="forward_weight"):
                call(direction=direction, forward_weight=0.5)
        with pytest.raises(ValueError, match="forward_weight"):
            call(direction="symmetric", forward_weight=1.5)
        with pytest.raises(ValueError, match="forward_weight"):
            call(direction="symmetric", forward_weight=float("nan"))
        for bad in ("0.5", True, torch.tensor(0.5)):
            with pytest.raises(TypeError, match="forward_weight"):
                call(direction="symmetric", forward_weight=bad)
        with pytest.raises(ValueError, match="direction"):
            call(direction="symmetrical")
    with pytest.raises(ValueError, match="beta"):
        cex_kernels.linear_kl(h, w, t, direction="symmetric", beta=0.5)
    expected = oracle_loss(s, t, 0.25, 2.0)
    for r in (np.float32(0.25), np.float64(0.25)):
        got = symmetric(s, t, r, temperature=2.0)
        torch.testing.assert_close(got.double(), expected, **TOLERANCES[torch.float32])
        module = cex_kernels.DistillKLLoss(direction="symmetric", forward_weight=r,
                                           temperature=2.0)
        torch.testing.assert_close(module(s, t).double(), expected, **TOLERANCES[torch.float32])
        assert "forward_weight=0.25" in repr(module)
