"""tvd / linear_tvd / TVDLoss against a float64 oracle written here (every backend that runs)."""
import math

import pytest
import torch

import cex_kernels
from conftest import (assert_close_to_reference, backend_cases, no_triton_reason,
                      CPU_PATHS, rerun_cpu_cases_on_path, skip_unsupported, triton_device)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny inputs: one thread is faster


def oracle_rows(s, t, temperature):
    """float64 per-row 1/2 Σ |softmax(s/T) - softmax(t/T)|, from exp and sums."""
    def softmax(x):
        z = x.double() / temperature
        e = torch.exp(z - z.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)
    return 0.5 * (softmax(s) - softmax(t)).abs().sum(-1)


def oracle(s, t, temperature=1.0, reduction="batchmean", keep=None):
    rows = oracle_rows(s, t, temperature)
    keep = torch.ones(rows.shape, dtype=torch.bool) if keep is None else keep
    rows = torch.where(keep, rows, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / keep.sum().clamp(min=1)


def make(lead=(4, 5), vocab=37, dtype=torch.float32, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * scale
    t = torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * scale
    return s.to(dtype), t.to(dtype)


def _grads_against_oracle(s, t, backend, dtype, what, **kw):
    ss, tt = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = cex_kernels.tvd(ss, tt, backend=backend, **kw)
    rs, rt = s.double().requires_grad_(), t.double().requires_grad_()
    keep = torch.ones(s.shape[:-1], dtype=torch.bool)
    if kw.get("mask") is not None:
        keep &= kw["mask"]
    if kw.get("labels") is not None:
        keep &= kw["labels"] != kw.get("ignore_index", -100)
    want = oracle(rs, rt, kw.get("temperature", 1.0), kw.get("reduction", "batchmean"), keep)
    assert loss.dtype == dtype and loss.shape == want.shape
    assert_close_to_reference(loss, want, dtype, f"{what} loss")
    up = torch.randn(want.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad(loss, (ss, tt), up.to(dtype))
    for name, g, e in zip(("student", "teacher"), got, torch.autograd.grad(want, (rs, rt), up)):
        assert g.dtype == dtype
        assert_close_to_reference(g, e, dtype, f"{what} grad {name}")


@pytest.mark.parametrize("device,backend", backend_cases("tvd"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction,temperature", [("batchmean", 1.0), ("sum", 0.5),
                                                   ("none", 3.0), ("batchmean", 0.05)])
def test_loss_and_gradients_match_oracle(device, backend, dtype, reduction, temperature):
    skip_unsupported(device, backend, dtype)
    s, t = make(dtype=dtype)
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    _grads_against_oracle(s, t, backend, dtype, f"{backend}", temperature=temperature,
                          reduction=reduction, mask=mask)


@pytest.mark.parametrize("device,backend", backend_cases("tvd"))
def test_labels_ignore_index_long_rows_and_vocab_tail(device, backend):
    """V = 300 (vector tails, several interpreter chunks); rows dropped by labels."""
    s, t = make(lead=(6,), vocab=300, seed=1)
    labels = torch.tensor([3, -100, 7, 1, -1, 0])
    _grads_against_oracle(s, t, backend, torch.float32, "labels", labels=labels,
                          ignore_index=-1, temperature=0.7)


@pytest.mark.parametrize("device,backend", backend_cases("tvd"))
def test_identical_inputs_give_zero_and_disjoint_supports_give_one(device, backend):
    s, _ = make(lead=(3,))
    s.requires_grad_()
    loss = cex_kernels.tvd(s, s.detach().clone(), backend=backend, reduction="none")
    assert torch.equal(loss, torch.zeros(3))
    (g,) = torch.autograd.grad(loss.sum(), s)
    assert torch.count_nonzero(g) == 0  # sign(0) = 0: the subgradient at the minimum
    a = torch.full((2, 6), -math.inf)
    b = torch.full((2, 6), -math.inf)
    a[:, :3], b[:, 3:] = 0.0, 1.0
    torch.testing.assert_close(cex_kernels.tvd(a, b, backend=backend, reduction="none"),
                               torch.ones(2))


@pytest.mark.parametrize("device,backend", backend_cases("tvd"))
def test_infinite_and_nan_logits(device, backend):
    """-inf logits are probability 0 (finite loss and gradients); a NaN in a kept row makes
    that row's loss and every entry of its gradients NaN; a dropped row is never read."""
    s, t = make(lead=(4,), vocab=20, seed=3)
    s[0, :5] = -math.inf
    t[1, 10:] = -math.inf
    s[2, 4] = math.nan
    t[3, 0] = math.nan
    mask = torch.tensor([True, True, True, False])
    ss, tt = s.clone().requires_grad_(), t.clone().requires_grad_()
    rows = cex_kernels.tvd(ss, tt, backend=backend, reduction="none", mask=mask)
    gs, gt = torch.autograd.grad(rows.sum(), (ss, tt))
    want = oracle(s[:2], t[:2], reduction="none")
    assert_close_to_reference(rows[:2], want, torch.float32, "-inf rows")
    assert torch.isfinite(gs[:2]).all() and torch.isfinite(gt[:2]).all()
    assert torch.isnan(rows[2]) and torch.isnan(gs[2]).all() and torch.isnan(gt[2]).all()
    assert rows[3] == 0 and not gs[3].any() and not gt[3].any()


@pytest.mark.parametrize("device,backend", backend_cases("tvd"))
def test_empty_strided_and_non_contiguous(device, backend):
    empty = torch.zeros(0, 7, requires_grad=True)
    loss = cex_kernels.tvd(empty, torch.zeros(0, 7), backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert cex_kernels.tvd(empty, torch.zeros(0, 7), backend=backend,
                           reduction="none").shape == (0,)
    one = torch.randn(3, 1)
    assert cex_kernels.tvd(one, torch.randn(3, 1), backend=backend).item() == 0.0
    s, t = make(lead=(5,), vocab=40, seed=4)
    # every other logit (stride 2 along V) and a transposed (V-major) layout
    _grads_against_oracle(s[:, ::2], t[:, ::2], backend, torch.float32, "strided")
    st, tt = s.T.contiguous().T, t.T.contiguous().T
    assert not st.is_contiguous()
    _grads_against_oracle(st, tt, backend, torch.float32, "non-contiguous")


@pytest.mark.parametrize("device,backend", backend_cases("tvd"))
def test_top_k_teacher_and_vocab_size(device, backend):
    s, t = make(lead=(5,), vocab=30, seed=6)
    values, indices = t.topk(6, dim=-1)
    values[1, -2:] = -math.inf  # padding
    dense = torch.full_like(t, -math.inf).scatter(-1, indices, values)
    ss, vv = s.clone().requires_grad_(), values.clone().requires_grad_()
    loss = cex_kernels.tvd(ss, (vv, indices), backend=backend, temperature=1.3)
    rs, rd = s.double().requires_grad_(), dense.double().requires_grad_()
    want = oracle(rs, rd, 1.3)
    assert_close_to_reference(loss, want, torch.float32, "top-k loss")
    g_s, g_v = torch.autograd.grad(loss, (ss, vv))
    w_s, w_d = torch.autograd.grad(want, (rs, rd))
    assert_close_to_reference(g_s, w_s, torch.float32, "top-k student grad")
    assert_close_to_reference(g_v, w_d.gather(-1, indices).masked_fill(values == -math.inf, 0),
                              torch.float32, "top-k values grad")
    wide = torch.cat([t, torch.randn(5, 4)], -1)  # a teacher padded to a larger vocabulary
    torch.testing.assert_close(cex_kernels.tvd(s, wide, vocab_size=30, backend=backend),
                               cex_kernels.tvd(s, t, backend=backend))


@pytest.mark.parametrize("reduction,backend", [("batchmean", "cpu"), ("none", "reference")])
def test_gradcheck_and_double_backward_float64(reduction, backend):
    s, t = make(lead=(3,), vocab=6, dtype=torch.float64, seed=7)
    s.requires_grad_(), t.requires_grad_()
    fn = (lambda a, b: cex_kernels.tvd(a, b, temperature=1.4, reduction=reduction,
                                       backend=backend))
    assert torch.autograd.gradcheck(fn, (s, t))
    assert torch.autograd.gradgradcheck(fn, (s, t))


@pytest.mark.parametrize("device,backend", backend_cases("tvd"))
def test_opcheck(device, backend):
    s, t = make(lead=(6,), vocab=13, seed=8)
    w = torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0, 1.0])
    for reduction, gs, gt in (("none", True, False), ("sum", True, True)):
        args = (s.clone().requires_grad_(gs), t.clone().requires_grad_(gt), w, None, 2.0,
                reduction, backend, gs, gt)
        torch.library.opcheck(torch.ops.cex.tvd.default, args)
    if backend == "triton":  # (the chunked op's schema is the same whatever the row kernel)
        return
    h = torch.randn(6, 5, requires_grad=True)
    args = (h, torch.randn(13, 5), None, [t], w, None, None, None, 1.0, 0.0, 2.0, 0.0, False,
            "sum", True, False, "logits", "tvd", backend, 4)
    torch.library.opcheck(torch.ops.cex.linear_loss_chunked.default, args)


def test_torch_compile_fullgraph_and_functorch():
    torch._dynamo.reset()
    s, t = make(lead=(6,), vocab=21, seed=9)
    s.requires_grad_()
    step = torch.compile(lambda a, b: cex_kernels.tvd(a, b, temperature=2.0), fullgraph=True,
                         backend="aot_eager")
    loss = step(s, t)
    rs = s.detach().double().requires_grad_()
    want = oracle(rs, t, 2.0)
    assert_close_to_reference(loss, want, torch.float32, "compiled loss")
    assert_close_to_reference(torch.autograd.grad(loss, s)[0], torch.autograd.grad(want, rs)[0],
                              torch.float32, "compiled grad")
    s64 = s.detach().double()
    grad = torch.func.grad(lambda a: cex_kernels.tvd(a, t.double(), temperature=2.0))(s64)
    rs = s64.clone().requires_grad_()
    assert_close_to_reference(grad, torch.autograd.grad(oracle(rs, t, 2.0), rs)[0],
                              torch.float64, "torch.func.grad")


def test_autocast_computes_in_the_wider_dtype():
    s, t = make(lead=(4,), vocab=16, seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cex_kernels.tvd(s.bfloat16(), t)
    assert loss.dtype == torch.float32
    assert_close_to_reference(loss, oracle(s.bfloat16(), t), torch.float32, "autocast")


def test_module_front_end():
    s, t = make(seed=11)
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) > 0.5
    loss_fn = cex_kernels.TVDLoss(temperature=2.0, reduction="sum")
    torch.testing.assert_close(loss_fn(s, t, mask=mask),
                               cex_kernels.tvd(s, t, temperature=2.0, reduction="sum", mask=mask))
    assert "temperature=2.0" in repr(loss_fn)
    with pytest.raises(ValueError, match="temperature"):
        cex_kernels.TVDLoss(temperature=-1.0)


def test_errors_name_the_argument():
    s, t = make(lead=(3,))
    with pytest.raises(ValueError, match="backend 'cuda' does not implement tvd"):
        cex_kernels.tvd(s, t, backend="cuda")
    with pytest.raises(TypeError, match="scale_by_t2"):
        cex_kernels.tvd(s, t, scale_by_t2=True)
    with pytest.raises(ValueError, match="batchmean"):
        cex_kernels.tvd(s, t, reduction="mean")
    with pytest.raises(ValueError, match="temperature"):
        cex_kernels.tvd(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="vocabulary size"):
        cex_kernels.tvd(s, t[:, :30])
    with pytest.raises(TypeError, match="float64"):
        cex_kernels.tvd(s, t.double())
    with pytest.raises(ValueError, match="mask"):
        cex_kernels.tvd(s, t, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend 'cuda' does not implement linear_tvd"):
        cex_kernels.linear_tvd(torch.randn(3, 4), torch.randn(37, 4), t, backend="cuda")


def test_auto_backend_skips_backends_without_tvd():
    from cex_kernels import _backends
    assert "tvd" not in _backends.get("cuda").kernels
    assert _backends.resolve_backend("tvd", "auto", torch.device("cpu"), torch.float32) in (
        "cpu", "reference")
    assert _backends.resolve_backend("linear_tvd", "auto", torch.device("cuda"),
                                     torch.float32) != "cuda"


# --- linear_tvd -----------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_cases("tvd"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("teacher", ["logits", "hidden", "top_k"])
def test_linear_tvd_matches_oracle(device, backend, dtype, teacher):
    skip_unsupported(device, backend, dtype)
    gen = torch.Generator().manual_seed(12)
    n, hid, vocab = 13, 8, 29
    h, w, b = (torch.randn(*shape, generator=gen, dtype=torch.float64) * sc
               for shape, sc in (((n, hid), 1.0), ((vocab, hid), 0.5), ((vocab,), 0.1)))
    th, tw = torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randn(vocab, 6, generator=gen, dtype=torch.float64)
    t_logits = th @ tw.T
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::5] = -100
    if teacher == "logits":
        given, dense = dict(teacher_logits=t_logits.to(dtype)), t_logits
    elif teacher == "hidden":
        given, dense = dict(teacher_hidden=th.to(dtype), teacher_weight=tw.to(dtype)), t_logits
    else:
        values, indices = t_logits.topk(5, dim=-1)
        given = dict(teacher_logits=(values.to(dtype), indices))
        dense = torch.full_like(t_logits, -math.inf).scatter(-1, indices, values)
    leaves = [x.to(dtype).requires_grad_() for x in (h, w, b)]
    loss = cex_kernels.linear_tvd(leaves[0], leaves[1], student_bias=leaves[2], **given,
                                  temperature=1.5, labels=labels, hard_label_weight=0.3,
                                  backend=backend, chunk_bytes=4 * vocab * 4)
    ref = [x.clone().requires_grad_() for x in (h, w, b)]
    z = ref[0] @ ref[1].T + ref[2]
    keep = labels != -100
    kd = torch.where(keep, oracle_rows(z, dense.to(dtype).double(), 1.5), 0.0)
    ce = torch.where(keep, torch.nn.functional.cross_entropy(z, labels.clamp(min=0),
                                                             reduction="none"), 0.0)
    want = (kd + 0.3 * ce).sum() / keep.sum()
    assert_close_to_reference(loss, want, dtype, f"linear_tvd {teacher}")
    for name, g, e in zip("hwb", torch.autograd.grad(loss, leaves), torch.autograd.grad(want, ref)):
        assert_close_to_reference(g, e, dtype, f"linear_tvd grad {name}")


def test_linear_tvd_reduction_none_parts_and_gradcheck():
    gen = torch.Generator().manual_seed(13)
    h = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 9, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 3), generator=gen)
    loss, kd, ce = cex_kernels.linear_tvd(h, w, t, reduction="none", labels=labels,
                                          return_parts=True, backend="cpu")
    assert loss.shape == kd.shape == ce.shape == (2, 3)
    assert_close_to_reference(kd, oracle_rows(h @ w.T, t, 1.0), torch.float64, "parts kd")
    assert torch.autograd.gradcheck(
        lambda a, b: cex_kernels.linear_tvd(a, b, t, reduction="none", temperature=0.9,
                                            backend="cpu", chunk_bytes=2 * 9 * 8), (h, w))


def test_benchmark_cell_steps_agree_with_eager_and_skip_cuda():
    """The ``tvd`` benchmark cell: each impl runnable here computes the eager loss and
    gradient (float64, a tiny shape); cuda, lacking the kernel, is not among the impls."""
    from cex_kernels import benchmarking as bench_specs
    spec = bench_specs.OPS["tvd"]
    assert "cuda" not in spec.impls and {"cpu", "reference", "eager"} <= set(spec.impls)
    results = {}
    for impl in ("eager", "cpu", "reference"):
        for mode in ("fwd", "fwd+bwd"):
            case = bench_specs.Case("tvd", (("N", 4), ("V", 33)), torch.float64, mode, "")
            inputs = spec.make_inputs(case, torch.device("cpu"))
            out = spec.make_step(impl, case, inputs)()
            results[impl, mode] = out if mode == "fwd" else inputs["student"].grad.clone()
    want = oracle(inputs["student"].detach(), inputs["teacher"])
    for impl in ("eager", "cpu", "reference"):
        assert_close_to_reference(results[impl, "fwd"], want, torch.float64, impl)
        torch.testing.assert_close(results[impl, "fwd+bwd"], results["eager", "fwd+bwd"])
    assert spec.min_bytes(case) == 3 * 4 * 33 * 8 and spec.flops(case) == 24 * 4 * 33


# --- Triton configs and the CPU's portable path ------------------------------------------------

def _gpu_configs():
    if triton_device() is None:
        return []
    from cex_kernels.triton.softmax_kl import CONFIGS
    return CONFIGS


@pytest.mark.skipif(triton_device() is None, reason=no_triton_reason())
@pytest.mark.parametrize("config", _gpu_configs(), ids=lambda c: f"V{c[0]}-w{c[1]}")
def test_every_gpu_config(config):
    """Each chunk size the GPU autotuner may pick gives the same rows and gradients,
    launched directly with that config (under the interpreter without a GPU)."""
    from cex_kernels.triton.softmax_kl import tvd_fwd
    device = triton_device()
    s, t = make(lead=(3,), vocab=5003, seed=14, dtype=torch.float32)
    s, t = s.to(device), t.to(device)
    weight = torch.tensor([0.5, 0.0, 2.0], device=device)
    rows, gs, gt = tvd_fwd(s, t, weight, 0.5, True, True, config=config)
    rs, rt = s.double().cpu().requires_grad_(), t.double().cpu().requires_grad_()
    want = weight.double().cpu() * oracle_rows(rs, rt, 2.0)
    w_s, w_t = torch.autograd.grad(want.sum(), (rs, rt))
    assert_close_to_reference(rows, want, torch.float32, "rows")
    assert_close_to_reference(gs, w_s, torch.float32, "grad student")
    assert_close_to_reference(gt, w_t, torch.float32, "grad teacher")


@pytest.mark.parametrize("path", sorted(CPU_PATHS))
def test_cpu_cases_on_other_cpu_paths(path):
    """The cpu cases above again on the portable (CEX_DISABLE_AVX2=1) and the AVX2
    (CEX_DISABLE_AVX512=1) paths; in-process they ran on the widest this CPU has."""
    rerun_cpu_cases_on_path(__file__, path)
