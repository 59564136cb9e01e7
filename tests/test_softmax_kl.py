"""softmax_kl / jsd against the float64 eager reference, on every backend that runs here."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cex_kernels
import oracle
from conftest import (CPU_PATHS, HAS_CUDA, assert_close_to_reference, backend_cases,
                      no_triton_reason, skip_unsupported, stand_in_autotune_timer,
                      triton_device)

# The Triton interpreter warns on the -inf - (-inf) of masked lanes; those lanes are discarded.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def skip_unsupported_here(device, backend, dtype):
    """conftest's skips, except bf16 under the Triton interpreter: that skip is for tl.dot,
    which this kernel does not use, so bf16 Triton is tested on the CPU too."""
    if backend == "triton" and dtype == torch.bfloat16:
        return
    skip_unsupported(device, backend, dtype)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
REDUCTIONS = ["batchmean", "sum", "none"]
# (kind, beta): the two KL directions and generalized JSDs.
DIVERGENCES = [("forward", 0.0), ("reverse", 1.0), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0),
               ("jsd", 0.3)]


def make_logits(lead, V, dtype, device, seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * spread
    t = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * spread
    return s.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device)


def call(kind, beta, s, t, **kw):
    if kind == "jsd":
        return cex_kernels.jsd(s, t, beta=beta, **kw)
    return cex_kernels.softmax_kl(s, t, direction=kind, **kw)


def ref_call(kind, beta, s, t, **kw):
    kw.pop("backend", None)
    if kind == "jsd":
        return oracle.jsd(s, t, beta=beta, **kw)
    return oracle.softmax_kl(s, t, direction=kind, **kw)


def _to64(x):
    return None if x is None else x.cpu()


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,beta", DIVERGENCES, ids=lambda x: str(x))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_student_grad_match_reference(device, backend, dtype, kind, beta,
                                                  temperature):
    skip_unsupported_here(device, backend, dtype)
    s, t = make_logits((2, 5), 37, dtype, device, seed=1)
    labels = torch.randint(0, 3, (2, 5), generator=torch.Generator().manual_seed(3)).to(device)
    labels[0, 0] = -100
    for reduction in REDUCTIONS:
        s_ = s.clone().requires_grad_()
        loss = call(kind, beta, s_, t, temperature=temperature, reduction=reduction,
                    labels=labels, backend=backend)
        assert loss.dtype == dtype and loss.device.type == device
        up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(4),
                         dtype=torch.float64)
        (g,) = torch.autograd.grad(loss, s_, up.to(dtype=dtype, device=device))
        rs = s.detach().double().cpu().requires_grad_()
        ref = ref_call(kind, beta, rs, t.double().cpu(), temperature=temperature,
                       reduction=reduction, labels=labels.cpu())
        (rg,) = torch.autograd.grad(ref, rs, up)
        assert_close_to_reference(loss, ref, dtype, f"{backend} {kind}{beta} {reduction} loss")
        assert_close_to_reference(g, rg, dtype, f"{backend} {kind}{beta} {reduction} grad")


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("kind,beta", DIVERGENCES, ids=lambda x: str(x))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_teacher_gradient(device, backend, kind, beta, reduction):
    dtype = torch.float32
    s, t = make_logits((7,), 29, dtype, device, seed=5)
    mask = torch.tensor([True, False, True, True, True, False, True], device=device)
    s.requires_grad_()
    t.requires_grad_()
    loss = call(kind, beta, s, t, temperature=2.5, reduction=reduction, mask=mask,
                backend=backend)
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    gs, gt = torch.autograd.grad(loss, [s, t], up.to(dtype=dtype, device=device))
    rs, rt = (x.detach().double().cpu().requires_grad_() for x in (s, t))
    ref = ref_call(kind, beta, rs, rt, temperature=2.5, reduction=reduction, mask=mask.cpu())
    rgs, rgt = torch.autograd.grad(ref, [rs, rt], up)
    assert_close_to_reference(loss, ref, dtype, "loss")
    assert_close_to_reference(gs, rgs, dtype, "student grad")
    assert_close_to_reference(gt, rgt, dtype, "teacher grad")


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("V", [1, 3, 257, 50257])
@pytest.mark.parametrize("kind,beta", [("forward", 0.0), ("jsd", 0.5)], ids=str)
def test_odd_vocab_sizes(device, backend, V, kind, beta):
    n = 2 if V > 1000 else 5
    s, t = make_logits((n,), V, torch.float32, device, seed=V)
    s.requires_grad_()
    loss = call(kind, beta, s, t, reduction="none", backend=backend)
    (g,) = torch.autograd.grad(loss.sum(), s)
    rs = s.detach().double().cpu().requires_grad_()
    ref = ref_call(kind, beta, rs, t.double().cpu(), reduction="none")
    (rg,) = torch.autograd.grad(ref.sum(), rs)
    assert_close_to_reference(loss, ref, torch.float32, f"V={V} loss")
    assert_close_to_reference(g, rg, torch.float32, f"V={V} grad")


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("kind,beta", DIVERGENCES, ids=str)
def test_neg_inf_logits(device, backend, kind, beta):
    s, t = make_logits((4,), 16, torch.float32, device, seed=7)
    inf = float("-inf")
    s[0, :3] = inf
    t[0, :3] = inf  # both -inf: 0 log 0 = 0
    t[1, 5] = inf   # teacher -inf only
    s[2, 7] = inf   # student -inf only
    loss = call(kind, beta, s, t, reduction="none", backend=backend)
    ref = ref_call(kind, beta, s.double().cpu(), t.double().cpu(), reduction="none")
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(loss).cpu(), finite), (loss, ref)
    if kind == "forward" or (kind == "jsd" and beta == 0.0):
        assert loss[2].item() == math.inf  # student -inf where the teacher has mass
    if kind == "reverse" or (kind == "jsd" and beta == 1.0):
        assert loss[1].item() == math.inf
    assert_close_to_reference(loss[finite.to(device)], ref[finite], torch.float32, "-inf rows")


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("kind,beta", [("forward", 0.0), ("reverse", 1.0), ("jsd", 0.5)], ids=str)
def test_nan_propagates_to_its_row(device, backend, kind, beta):
    s, t = make_logits((5,), 20, torch.float32, device)
    t[3, 4] = float("nan")
    rows = call(kind, beta, s, t, reduction="none", backend=backend)
    assert torch.isnan(rows[3])
    assert torch.isfinite(rows[torch.arange(5, device=device) != 3]).all()
    assert torch.isnan(call(kind, beta, s, t, backend=backend))
    mask = torch.arange(5, device=device) != 3  # a dropped NaN row does not count
    assert torch.isfinite(call(kind, beta, s, t, mask=mask, backend=backend))


@pytest.mark.parametrize("device,backend", backend_cases())
def test_large_bf16_logits(device, backend):
    s, t = make_logits((3,), 300, torch.bfloat16, device, seed=8, spread=1e4)
    s.requires_grad_()
    loss = cex_kernels.softmax_kl(s, t, temperature=1.0, backend=backend)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    rs = s.detach().double().cpu().requires_grad_()
    ref = oracle.softmax_kl(rs, t.double().cpu())
    (rg,) = torch.autograd.grad(ref, rs)
    assert_close_to_reference(loss, ref, s.dtype, "1e4 logits loss")
    assert_close_to_reference(g, rg, s.dtype, "1e4 logits grad")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_masks_and_zero_kept_rows(device, backend):
    s, t = make_logits((2, 3), 11, torch.float32, device)
    s.requires_grad_()
    mask = torch.tensor([[True, False, True], [False, False, True]], device=device)
    labels = torch.tensor([[5, 1, -1], [2, 2, 2]], device=device)
    loss = cex_kernels.softmax_kl(s, t, mask=mask, labels=labels, ignore_index=-1,
                                  backend=backend)
    ref = oracle.softmax_kl(s.double().cpu(), t.double().cpu(), mask=mask.cpu(),
                               labels=labels.cpu(), ignore_index=-1)
    assert_close_to_reference(loss, ref, torch.float32, "masked batchmean")
    rows = cex_kernels.softmax_kl(s, t, mask=mask, reduction="none", backend=backend)
    assert (rows[~mask] == 0).all() and (rows[mask] > 0).all()
    none_kept = torch.zeros(2, 3, dtype=torch.bool, device=device)
    for reduction in ("batchmean", "sum"):
        zero = cex_kernels.softmax_kl(s, t, mask=none_kept, reduction=reduction, backend=backend)
        (g,) = torch.autograd.grad(zero, s)
        assert zero.item() == 0.0 and (g == 0).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind,beta", [("forward", 0.0), ("reverse", 1.0), ("jsd", 0.3)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(backend, kind, beta, reduction):
    s, t = make_logits((2, 3), 6, torch.float64, "cpu", seed=9, spread=1.0)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    s.requires_grad_()
    t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: call(kind, beta, a, b, temperature=1.7, reduction=reduction, mask=mask,
                          backend=backend), (s, t))


@pytest.mark.parametrize("device,backend", backend_cases())
def test_opcheck(device, backend):
    s, t = make_logits((6,), 13, torch.float32, device, seed=10)
    w = torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0, 1.0], device=device)
    # (beta, reduction, grad_student, grad_teacher): each mode and gradient flag once.
    for beta, reduction, gs, gt in ((0.0, "none", False, False), (0.0, "sum", True, False),
                                    (1.0, "none", True, True), (0.5, "sum", True, True),
                                    (0.3, "none", False, True)):
        args = (s.clone().requires_grad_(gs), t.clone().requires_grad_(gt), w, None, 2.0, beta,
                False, reduction, backend, gs, gt)
        torch.library.opcheck(torch.ops.cex.softmax_kl.default, args)


# Not the Triton interpreter: dynamo cannot trace through it. Triton on CUDA is included.
@pytest.mark.parametrize("device,backend",
                         [c for c in backend_cases() if c.values != ("cpu", "triton")])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    s, t = make_logits((4, 3), 19, torch.float32, device, seed=11)
    mask = torch.rand(4, 3, generator=torch.Generator().manual_seed(1)).to(device) > 0.3
    s.requires_grad_()

    def step(student, teacher, keep):
        return cex_kernels.jsd(student, teacher, beta=0.3, temperature=2.0, mask=keep,
                               backend=backend) * 3.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(s, t, mask)
    (grad,) = torch.autograd.grad(loss, s)
    rs = s.detach().double().requires_grad_()
    ref = oracle.jsd(rs, t.double(), beta=0.3, temperature=2.0, mask=mask) * 3.0
    (rg,) = torch.autograd.grad(ref, rs)
    assert_close_to_reference(loss, ref, torch.float32, "compiled loss")
    assert_close_to_reference(grad, rg, torch.float32, "compiled grad")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_backward_scales_the_forward_gradient_in_place(device, backend):
    s, t = make_logits((5,), 12, torch.float32, device)
    s.requires_grad_()
    w = torch.ones(5, device=device)
    loss, gs, _ = torch.ops.cex.softmax_kl(s, t, w, None, 1.0, 0.0, False, "sum", backend,
                                           True, False)
    (loss * 2).backward()
    assert s.grad.data_ptr() == gs.data_ptr()
    loss = cex_kernels.softmax_kl(s.detach().requires_grad_(), t, reduction="sum", backend=backend)
    rs = s.detach().double().requires_grad_()
    (oracle.softmax_kl(rs, t.double(), reduction="sum") * 2).backward()
    assert_close_to_reference(s.grad, rs.grad, torch.float32, "in-place grad")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_retain_graph_backward_twice(device, backend):
    s, t = make_logits((6,), 9, torch.float32, device)
    s.requires_grad_()
    loss = cex_kernels.softmax_kl(s, t, direction="reverse", reduction="sum", backend=backend)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    (loss * 3).backward()
    torch.testing.assert_close(s.grad, 4 * first)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_unit_upstream_skip_never_scales_a_kept_gradient_twice(device, backend):
    # Backward skips its scaling pass for an upstream of exactly 1 (CPU). Upstream 1 twice
    # with retain_graph, then 2 without: if a skipped pass let .grad alias the stored
    # gradient, the second accumulation would double it and the third backward read it.
    s, t = make_logits((6,), 9, torch.float32, device, seed=3)
    s.requires_grad_()
    loss = cex_kernels.softmax_kl(s, t, reduction="sum", backend=backend)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    (loss * 2).backward()
    rs = s.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(oracle.softmax_kl(rs, t.double(), reduction="sum"), rs)
    assert_close_to_reference(s.grad, 4 * ref, torch.float32, "1, 1 (retained), then 2")


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("upstream", [[1.0] * 5, [1.0, 0.5, 1.0, -3.0, 1.0]], ids=["ones", "mixed"])
def test_per_row_upstream_with_reduction_none(device, backend, upstream):
    s, t = make_logits((5,), 11, torch.float32, device, seed=4)
    s.requires_grad_()
    g = torch.tensor(upstream, device=device)
    cex_kernels.jsd(s, t, beta=0.3, reduction="none", backend=backend).backward(g)
    rs = s.detach().double().requires_grad_()
    oracle.jsd(rs, t.double(), beta=0.3, reduction="none").backward(g.double())
    assert_close_to_reference(s.grad, rs.grad, torch.float32, f"upstream {upstream}")


@pytest.mark.parametrize("upstream", [1.0, 2.0 ** 13, 2.0 ** 15, 3.0])
def test_fp16_upstream_scales_including_a_total_factor_of_one(upstream):
    # fp16 stores S x gradient (no divisor) and scales by upstream / S in backward ("sum"):
    # an upstream equal to S (2^13 here: the forward KL bounds |dL/dz| by 2) makes the total
    # factor exactly 1, and the pass is skipped.
    s16, t16 = make_logits((64,), 50, torch.float16, "cpu", seed=5)
    s = s16.clone().requires_grad_()
    (cex_kernels.softmax_kl(s, t16, reduction="sum", backend="cpu") * upstream).backward()
    rs = s16.double().requires_grad_()
    (oracle.softmax_kl(rs, t16.double(), reduction="sum") * upstream).backward()
    assert torch.isfinite(s.grad).all()
    assert_close_to_reference(s.grad, rs.grad, torch.float16, f"fp16 upstream {upstream}")


def test_non_contiguous_and_vocab_size():
    s, t = make_logits((8,), 40, torch.float32, "cpu", seed=12)
    for backend in ("cpu", "reference"):
        loss = cex_kernels.softmax_kl(s[::2, ::2], t[::2, ::2], reduction="none", backend=backend)
        ref = oracle.softmax_kl(s[::2, ::2].double(), t[::2, ::2].double(), reduction="none")
        assert_close_to_reference(loss, ref, torch.float32, "strided")
        padded = torch.cat([t, torch.randn(8, 7)], dim=-1)
        loss = cex_kernels.softmax_kl(s, padded, vocab_size=40, backend=backend)
        assert_close_to_reference(loss, oracle.softmax_kl(s.double(), t.double()),
                                  torch.float32, "vocab_size")


def test_distill_kl_loss_module():
    s, t = make_logits((3, 4), 10, torch.float32, "cpu")
    mod = cex_kernels.DistillKLLoss(temperature=2.0, direction="reverse")
    assert_close_to_reference(mod(s, t), oracle.softmax_kl(s.double(), t.double(),
                                                              temperature=2.0, direction="reverse"),
                              torch.float32, "module kl")
    mod = cex_kernels.DistillKLLoss(beta=0.3, reduction="sum")
    assert_close_to_reference(mod(s, t), oracle.jsd(s.double(), t.double(), beta=0.3,
                                                       reduction="sum"), torch.float32, "module jsd")
    assert "beta=0.3" in repr(mod)


def test_bad_inputs():
    s, t = make_logits((4,), 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"student vocabulary size 10.*teacher vocabulary size 12"):
        cex_kernels.softmax_kl(s, torch.randn(4, 12))
    with pytest.raises(ValueError, match="temperature"):
        cex_kernels.softmax_kl(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        cex_kernels.jsd(s, t, temperature=-1.0)
    with pytest.raises(ValueError, match=r"leading.*|\(4, 10\).*\(3, 10\)"):
        cex_kernels.softmax_kl(s, t[:3])
    with pytest.raises(TypeError, match="dtype"):
        cex_kernels.softmax_kl(s, t.double())
    with pytest.raises(TypeError, match="float32"):
        cex_kernels.softmax_kl(s.long(), t.long())
    with pytest.raises(ValueError, match="direction"):
        cex_kernels.softmax_kl(s, t, direction="both")
    with pytest.raises(ValueError, match="reduction"):
        cex_kernels.softmax_kl(s, t, reduction="mean")
    with pytest.raises(ValueError, match="beta"):
        cex_kernels.jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="mask"):
        cex_kernels.softmax_kl(s, t, mask=torch.ones(4))
    with pytest.raises(ValueError, match="labels"):
        cex_kernels.softmax_kl(s, t, labels=torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        cex_kernels.softmax_kl(s, t, vocab_size=11)
    with pytest.raises(ValueError, match="empty vocabulary"):
        cex_kernels.softmax_kl(s[:, :0], t[:, :0])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            cex_kernels.softmax_kl(s, t.cuda())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 20), V=st.integers(1, 300), beta=st.sampled_from([0.0, 0.4, 1.0]),
       reduction=st.sampled_from(REDUCTIONS), backend=st.sampled_from(["cpu", "reference"]),
       temperature=st.sampled_from([0.5, 1.0, 3.0]), seed=st.integers(0, 2**16))
def test_fuzz_shapes(n, V, beta, reduction, backend, temperature, seed):
    s, t = make_logits((n,), V, torch.float32, "cpu", seed=seed)
    s.requires_grad_()
    keep = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.2
    loss = cex_kernels.jsd(s, t, beta=beta, temperature=temperature, reduction=reduction,
                           mask=keep, backend=backend)
    rs = s.detach().double().requires_grad_()
    ref = oracle.jsd(rs, t.double(), beta=beta, temperature=temperature, reduction=reduction,
                        mask=keep)
    assert_close_to_reference(loss, ref, torch.float32, "fuzz loss")
    (g,) = torch.autograd.grad(loss.sum(), s)
    (rg,) = torch.autograd.grad(ref.sum(), rs)
    assert_close_to_reference(g, rg, torch.float32, "fuzz grad")


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 6), V=st.integers(1, 200), beta=st.sampled_from([0.0, 0.4, 1.0]))
def test_fuzz_shapes_triton(n, V, beta):
    device = triton_device()
    if device is None:
        pytest.skip(no_triton_reason())
    s, t = make_logits((n,), V, torch.float32, device, seed=n * 7 + V)
    loss = cex_kernels.jsd(s, t, beta=beta, reduction="none", backend="triton")
    ref = oracle.jsd(s.double().cpu(), t.double().cpu(), beta=beta, reduction="none")
    assert_close_to_reference(loss, ref, torch.float32, "fuzz triton")


_PORTABLE_PATH_SCRIPT = """
import torch, cex_kernels
import oracle
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
    for beta in (0.0, 0.4, 1.0):
        s = (torch.randn(5, 77) * 3).to(dtype).requires_grad_()
        t = (torch.randn(5, 77) * 3).to(dtype).requires_grad_()
        loss = cex_kernels.jsd(s, t, beta=beta, temperature=2.0, reduction="sum", backend="cpu")
        gs, gt = torch.autograd.grad(loss, [s, t])
        rs, rt = (x.detach().double().requires_grad_() for x in (s, t))
        ref = oracle.jsd(rs, rt, beta=beta, temperature=2.0, reduction="sum")
        rgs, rgt = torch.autograd.grad(ref, [rs, rt])
        for a, b in ((loss, ref), (gs, rgs), (gt, rgt)):
            scale = b.abs().max().item()
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=1e-6 + tol * scale)
print("ok")
"""


@pytest.mark.parametrize("path", sorted(CPU_PATHS))
def test_cpu_other_simd_paths(path):
    """The CPU backend's baseline-ISA path (used where AVX2/FMA are missing) and its AVX2
    path (where AVX-512 is) give the same results; the tests above exercise the widest path
    this machine has."""
    import os
    import subprocess
    import sys
    if not cex_kernels.backends()["cpu"]:
        pytest.skip("compiled extension not built")
    tests_dir = os.path.dirname(os.path.abspath(__file__))  # for `import oracle`
    env = dict(os.environ, **CPU_PATHS[path],
               PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _PORTABLE_PATH_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_teacher_only_gradient_and_no_grad():
    s, t = make_logits((4,), 9, torch.float32, "cpu", seed=13)
    t.requires_grad_()
    loss = cex_kernels.jsd(s, t, beta=0.3, backend="cpu")
    (g,) = torch.autograd.grad(loss, t)
    rt = t.detach().double().requires_grad_()
    (rg,) = torch.autograd.grad(oracle.jsd(s.double(), rt, beta=0.3), rt)
    assert_close_to_reference(g, rg, torch.float32, "teacher-only grad")
    _, gs, gt = torch.ops.cex.softmax_kl(s, t.detach(), torch.ones(4), None, 1.0, 0.0, False,
                                         "sum", "cpu", False, False)
    assert gs.numel() == 0 and gt.numel() == 0
    with torch.no_grad():
        assert cex_kernels.softmax_kl(s.requires_grad_(), t).grad_fn is None


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_torch_compile_inductor(device):
    """The default (inductor) compiler traces the op and its backward without graph breaks,
    with the default backend (triton on CUDA)."""
    torch._dynamo.reset()
    s, t = make_logits((16,), 24, torch.float32, device, seed=14)
    labels = (torch.arange(16) % 5 - 1).to(device)  # some -1 rows dropped
    s.requires_grad_()
    compiled = torch.compile(
        lambda a, b, y: cex_kernels.softmax_kl(a, b, labels=y, ignore_index=-1, temperature=2.0),
        fullgraph=True)
    loss = compiled(s, t, labels)
    loss.backward()
    rs = s.detach().double().requires_grad_()
    ref = oracle.softmax_kl(rs, t.double(), labels=labels, ignore_index=-1, temperature=2.0)
    ref.backward()
    assert_close_to_reference(loss, ref, torch.float32, "inductor loss")
    assert_close_to_reference(s.grad, rs.grad, torch.float32, "inductor grad")


def _gpu_configs():
    if triton_device() is None:  # the kernel modules need a usable Triton to import
        return []
    from cex_kernels.triton.softmax_kl import CONFIGS
    return CONFIGS


@pytest.mark.skipif(triton_device() is None, reason=no_triton_reason())
@pytest.mark.parametrize("config", _gpu_configs(), ids=lambda c: f"V{c[0]}-w{c[1]}")
@pytest.mark.parametrize("V", [4096, 5003], ids=["V-divisible", "V-tail"])
@pytest.mark.parametrize("beta,symmetric", [(0.0, False), (0.5, False), (0.3, True)],
                         ids=["kl", "jsd", "symmetric"])
def test_every_gpu_config(config, V, beta, symmetric):
    """Each chunk size the GPU autotuner may pick computes the same rows and gradients,
    launched directly with that config (under the interpreter without a GPU)."""
    from cex_kernels.triton.softmax_kl import softmax_kl_fwd
    device = triton_device()
    for dtype in (torch.float32, torch.bfloat16):
        s, t = make_logits((3,), V, dtype, device, seed=V)
        weight = torch.tensor([0.5, 0.0, 2.0], device=device)
        got = softmax_kl_fwd(s, t, weight, 0.5, beta, symmetric, True, True, config=config)
        want = oracle.softmax_kl_rows(s.double(), t.double(), weight.double(), 0.5, beta,
                                         symmetric, True, True)
        for name, g, w in zip(("rows", "grad student", "grad teacher"), got, want):
            assert_close_to_reference(g, w, dtype, f"{name} {dtype}")


@pytest.mark.skipif(triton_device() is None, reason=no_triton_reason())
def test_autotuned_launch(monkeypatch):
    """The autotuned launch (a GPU's default) gives the same rows and gradients, whichever
    config wins, on the call that tunes: driven with a stand-in timer."""
    from cex_kernels.triton import softmax_kl as kernels
    device = triton_device()
    s, t = make_logits((3,), 5003, torch.float32, device, seed=4)
    weight = torch.tensor([1.0, 0.0, 0.5], device=device)
    want = oracle.softmax_kl_rows(s.double(), t.double(), weight.double(), 1.0, 0.3, False,
                                     True, True)
    for winner in range(len(kernels.CONFIGS)):
        timed = stand_in_autotune_timer(monkeypatch, kernels.softmax_kl_fwd_tuned, winner)
        got = kernels.softmax_kl_fwd(s, t, weight, 1.0, 0.3, False, True, True, autotune=True)
        assert timed() == len(kernels.CONFIGS)
        for name, g, w in zip(("rows", "grad student", "grad teacher"), got, want):
            assert_close_to_reference(g, w, torch.float32, f"{name}, config {winner} won")


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_top_k_teacher_matches_dense_minus_inf_teacher(device, backend, beta):
    """A (values, indices) teacher is the softmax over its k entries."""
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(6, 50, generator=gen).to(device).requires_grad_()
    values = torch.randn(6, 5, generator=gen).to(device).requires_grad_()
    indices = torch.stack([torch.randperm(50, generator=gen)[:5] for _ in range(6)]).to(device)
    loss = cex_kernels.jsd(student, (values, indices), beta=beta, temperature=1.5, backend=backend)
    dense = torch.full((6, 50), float("-inf"), dtype=torch.float64).scatter(
        1, indices.cpu(), values.detach().double().cpu()).requires_grad_()
    ref_student = student.detach().double().cpu().requires_grad_()
    expected = oracle.jsd(ref_student, dense, beta=beta, temperature=1.5)
    assert_close_to_reference(loss, expected, torch.float32, "top-k loss")
    loss.backward()
    expected.backward()
    assert_close_to_reference(student.grad, ref_student.grad, torch.float32, "top-k student grad")
    ref_values_grad = dense.grad.gather(1, indices.cpu())
    assert_close_to_reference(values.grad, ref_values_grad, torch.float32, "top-k values grad")


def test_top_k_teacher_bad_input():
    s = torch.randn(4, 10)
    v, i = torch.randn(4, 3), torch.randint(0, 10, (4, 3))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        cex_kernels.softmax_kl(s, (v, i + 10))
    with pytest.raises(ValueError, match="leading dims"):
        cex_kernels.softmax_kl(s, (v[:3], i[:3]))
    with pytest.raises(TypeError, match="indices"):
        cex_kernels.softmax_kl(s, (v, i.float()))
    with pytest.raises(ValueError, match="pair"):
        cex_kernels.softmax_kl(s, (v, i, i))


def test_fwd_bwd_extra_memory_is_one_gradient():
    """Gradient-in-forward: a plain loss.backward() costs one (N, V) tensor (the .grad),
    no zero-filled gradients for the op's internal outputs, no copy in AccumulateGrad."""
    from cex_kernels.benchmarking.measure import peak_extra_memory
    n, v = 64, 4096
    s = torch.randn(n, v, requires_grad=True)
    t = torch.randn(n, v)

    def step():
        s.grad = None
        cex_kernels.softmax_kl(s, t, temperature=2.0, backend="cpu").backward()

    grad_bytes = n * v * 4
    assert peak_extra_memory(step, "cpu") < 1.05 * grad_bytes
