"""projected_mse against the float64 eager reference, on every backend that runs here."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cex_kernels
import oracle
from conftest import (HAS_CUDA, assert_close_to_reference, backend_cases,
                      math_mode_dtypes, no_triton_reason, skip_unsupported,
                      stand_in_autotune_timer, triton_device)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
REDUCTIONS = ["mean", "sum", "none"]
COMPILE_DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# (leading shape, d_t, d_s): one row; sizes that are multiples of no block size; d_s > d_t
# and d_s < d_t; leading batch dimensions; then sizes the blocks divide (the Triton kernel
# drops its masks for them): d_t only, d_s only, and both, for the interpreter's 16-blocks
# and for every GPU config's blocks.
SHAPES = [((1,), 16, 8), ((37,), 50, 21), ((13,), 5, 40), ((2, 3, 7), 33, 17), ((65,), 130, 3),
          ((20,), 48, 30), ((9,), 40, 64), ((130,), 256, 128)]


def make_inputs(lead, d_t, d_s, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*lead, d_s, generator=gen, dtype=torch.float64)
    teacher = torch.randn(*lead, d_t, generator=gen, dtype=torch.float64)
    projection = cex_kernels.random_projection(d_t, d_s, seed=seed, dtype=torch.float64)
    return [x.to(dtype=dtype, device=device) for x in (student, teacher, projection)]


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}")
def test_forward_matches_reference(device, backend, dtype, reduction, shape):
    skip_unsupported(device, backend, dtype)
    student, teacher, projection = make_inputs(*shape, dtype, device)
    loss = cex_kernels.projected_mse(student, teacher, projection, reduction=reduction,
                                     backend=backend)
    expected = oracle.projected_mse(student.double(), teacher.double(), projection.double(),
                                       reduction)
    assert loss.dtype == dtype and loss.device.type == device
    assert loss.shape == (shape[0] if reduction == "none" else ())
    assert_close_to_reference(loss, expected, dtype, f"{backend} loss")


GRAD_COMBOS = [(True, False, False), (False, True, False), (False, False, True),
               (True, True, True), (True, False, True)]


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("needs", GRAD_COMBOS, ids=lambda n: "".join("STP"[i] for i in range(3) if n[i]))
def test_gradients_match_reference(device, backend, dtype, reduction, needs):
    skip_unsupported(device, backend, dtype)
    inputs = make_inputs((2, 19), 45, 23, dtype, device, seed=1)
    for x, need in zip(inputs, needs):
        x.requires_grad_(need)
    loss = cex_kernels.projected_mse(*inputs, reduction=reduction, backend=backend)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64)
    wanted = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad(loss, wanted, upstream.to(dtype=dtype, device=device))

    ref_inputs = [x.detach().double().cpu().requires_grad_(x.requires_grad) for x in inputs]
    ref_loss = oracle.projected_mse(*ref_inputs, reduction=reduction)
    ref_grads = torch.autograd.grad(ref_loss, [x for x in ref_inputs if x.requires_grad], upstream)
    for name, g, rg in zip([n for n, need in zip("STP", needs) if need], grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape
        assert_close_to_reference(g, rg, dtype, f"{backend} grad of {name}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(backend, reduction):
    s, t, p = make_inputs((2, 5), 7, 6, torch.float64, "cpu", seed=3)
    for x in (s, t, p):
        x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: cex_kernels.projected_mse(a, b, c, reduction=reduction, backend=backend),
        (s, t, p))


@pytest.mark.parametrize("device,backend", backend_cases())
def test_opcheck(device, backend):
    dtype = torch.float32
    s, t, p = make_inputs((9,), 20, 12, dtype, device, seed=4)
    for reduction in REDUCTIONS:
        for compute_grad in (False, True):
            args = (s.clone().requires_grad_(compute_grad), t, p, reduction, backend, compute_grad)
            torch.library.opcheck(torch.ops.cex.projected_mse.default, args)


# Not the Triton interpreter: dynamo cannot trace through it. Triton on CUDA is included.
@pytest.mark.parametrize("device,backend",
                         [c for c in backend_cases() if c.values != ("cpu", "triton")])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    s, t, p = make_inputs((4, 10), 24, 12, torch.float32, device, seed=5)
    s.requires_grad_()

    def step(student, teacher, projection):
        return cex_kernels.projected_mse(student, teacher, projection, backend=backend) * 3.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(s, t, p)
    (grad,) = torch.autograd.grad(loss, s)
    ref = oracle.projected_mse(s.double(), t.double(), p.double()) * 3.0
    (ref_grad,) = torch.autograd.grad(ref, s)
    assert_close_to_reference(loss, ref, torch.float32, "compiled loss")
    assert_close_to_reference(grad, ref_grad, torch.float32, "compiled grad")


@pytest.mark.parametrize("device", COMPILE_DEVICES)
def test_torch_compile_inductor(device):
    """The default (inductor) compiler traces the op and its backward without graph breaks,
    with the default backend (triton on CUDA)."""
    torch._dynamo.reset()
    s, t, p = make_inputs((32,), 24, 12, torch.float32, device, seed=6)
    s.requires_grad_()
    compiled = torch.compile(lambda a, b, c: cex_kernels.projected_mse(a, b, c, reduction="sum"),
                             fullgraph=True)
    loss = compiled(s, t, p)
    loss.backward()
    ref_s = s.detach().double().requires_grad_()
    ref = oracle.projected_mse(ref_s, t.double(), p.double(), "sum")
    ref.backward()
    assert_close_to_reference(loss, ref, torch.float32, "inductor loss")
    assert_close_to_reference(s.grad, ref_s.grad, torch.float32, "inductor grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device,backend", backend_cases())
def test_non_contiguous_inputs(device, backend, dtype):
    """Strided rows and columns, with the student's gradient (bf16 on the cpu backend: the
    product formed in the gradient's memory by one GEMM, then the epilogue in place)."""
    skip_unsupported(device, backend, dtype)
    base_s, base_t, p = make_inputs((24,), 30, 32, dtype, device, seed=7)
    student = base_s[::2, ::2].detach().requires_grad_()  # strided rows and columns
    teacher = base_t.T.contiguous().T[::2]  # column-major rows
    projection = p[:, ::2]
    assert not student.is_contiguous() and not teacher.is_contiguous()
    loss = cex_kernels.projected_mse(student, teacher, projection, reduction="none", backend=backend)
    ref_s = student.detach().double().requires_grad_()
    expected = oracle.projected_mse(ref_s, teacher.double(), projection.double(), "none")
    assert_close_to_reference(loss, expected, dtype, "non-contiguous")
    upstream = torch.rand(expected.shape, generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64)
    loss.backward(upstream.to(loss.dtype).to(device))
    expected.backward(upstream.to(loss.dtype).double())
    assert_close_to_reference(student.grad, ref_s.grad, dtype, "non-contiguous grad")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_zero_rows(device, backend):
    s, t, p = make_inputs((0,), 8, 4, torch.float32, device)
    s.requires_grad_()
    assert math.isnan(cex_kernels.projected_mse(s, t, p, backend=backend).item())  # as F.mse_loss
    total = cex_kernels.projected_mse(s, t, p, reduction="sum", backend=backend)
    assert total.item() == 0.0
    total.backward()
    assert s.grad.shape == s.shape
    assert cex_kernels.projected_mse(s, t, p, reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate(device, backend, bad):
    s, t, p = make_inputs((8,), 16, 16, torch.float32, device)
    t[3, 5] = bad
    rows = cex_kernels.projected_mse(s, t, p, reduction="none", backend=backend)
    assert not torch.isfinite(rows[3])
    assert torch.isfinite(rows[torch.arange(8, device=device) != 3]).all()
    assert not torch.isfinite(cex_kernels.projected_mse(s, t, p, backend=backend))


@pytest.mark.parametrize("device,backend", backend_cases())
def test_retain_graph_backward_twice(device, backend):
    """The stored gradient is scaled in place only when the graph is freed afterwards."""
    s, t, p = make_inputs((6,), 8, 4, torch.float32, device)
    s.requires_grad_()
    loss = cex_kernels.projected_mse(s, t, p, reduction="sum", backend=backend)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    (loss * 3).backward()  # frees the graph: this one may scale in place
    torch.testing.assert_close(s.grad, 4 * first)
    ref_s = s.detach().double().requires_grad_()
    oracle.projected_mse(ref_s, t.double(), p.double(), "sum").backward()
    assert_close_to_reference(first, ref_s.grad, torch.float32, "retained grad")


def test_no_gradient_buffer_without_grad():
    s, t, p = make_inputs((6,), 8, 4, torch.float32, "cpu")
    _, grad = torch.ops.cex.projected_mse(s, t, p, "mean", "cpu", False)
    assert grad.numel() == 0
    with torch.no_grad():
        assert cex_kernels.projected_mse(s.requires_grad_(), t, p).grad_fn is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 70), d_t=st.integers(1, 70), d_s=st.integers(1, 70),
       reduction=st.sampled_from(REDUCTIONS), backend=st.sampled_from(["cpu", "reference"]),
       seed=st.integers(0, 2**16))
def test_fuzz_shapes(n, d_t, d_s, reduction, backend, seed):
    s, t, p = make_inputs((n,), d_t, d_s, torch.float32, "cpu", seed=seed)
    s.requires_grad_()
    loss = cex_kernels.projected_mse(s, t, p, reduction=reduction, backend=backend)
    ref_s = s.detach().double().requires_grad_()
    expected = oracle.projected_mse(ref_s, t.double(), p.double(), reduction)
    if n == 0 and reduction == "mean":
        assert math.isnan(loss.item())
        return
    assert_close_to_reference(loss, expected, torch.float32, "fuzz loss")
    loss.sum().backward()
    expected.sum().backward()
    assert_close_to_reference(s.grad, ref_s.grad, torch.float32, "fuzz grad")


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), d_t=st.integers(1, 40), d_s=st.integers(1, 40))
def test_fuzz_shapes_triton(n, d_t, d_s):
    device = triton_device()
    if device is None:
        pytest.skip(no_triton_reason())
    s, t, p = make_inputs((n,), d_t, d_s, torch.float32, device, seed=n * 7 + d_t)
    loss = cex_kernels.projected_mse(s, t, p, reduction="none", backend="triton")
    expected = oracle.projected_mse(s.double(), t.double(), p.double(), "none")
    assert_close_to_reference(loss, expected, torch.float32, "fuzz triton")


def _gpu_config_cases():
    if triton_device() is None:  # the kernel modules need a usable Triton to import
        return []
    from cex_kernels.triton.projected_mse import CONFIGS
    return [pytest.param(mode, cfg, id=f"{mode}-{'x'.join(map(str, cfg[:3]))}-g{cfg[3]}-w{cfg[4]}-s{cfg[5]}")
            for mode, configs in CONFIGS.items() for cfg in configs]


@pytest.mark.skipif(triton_device() is None, reason=no_triton_reason())
@pytest.mark.parametrize("mode,config", _gpu_config_cases())
# (N, d_t, d_s): sizes every block divides, with enough row tiles for several GROUP_M
# groups; then sizes no block divides (row, K and column tails).
@pytest.mark.parametrize("shape", [(2100, 256, 256), (130, 200, 100)], ids=["divisible", "tails"])
def test_every_gpu_config(mode, config, shape):
    """Each block shape the GPU autotuner may pick computes the same function: launched
    directly with that config (under the interpreter without a GPU)."""
    from cex_kernels.triton.projected_mse import projected_mse_fwd
    device = triton_device()
    with math_mode_dtypes(mode, device) as dtypes:
        for dtype, tol_dtype in dtypes:
            s, t, p = make_inputs((shape[0],), shape[1], shape[2], dtype, device, seed=5)
            row_sq, grad = projected_mse_fwd(s, t, p, 0.5, True, config=config)
            diff = s.double() - t.double() @ p.double()
            assert_close_to_reference(row_sq, (diff * diff).sum(1), tol_dtype, f"{dtype} rows")
            assert_close_to_reference(grad, 0.5 * diff, tol_dtype, f"{dtype} grad")


@pytest.mark.skipif(triton_device() is None, reason=no_triton_reason())
def test_autotuning_call_returns_the_right_loss(monkeypatch):
    """The call that autotunes benchmarks every config on the real buffers first. With a
    stand-in timer that makes a config with wider column tiles win after narrower ones ran,
    nothing the losers wrote may leak into the loss (the per-column-tile partial sums)."""
    from cex_kernels.triton import projected_mse as kernels
    device = triton_device()
    widths = [cfg[1] for cfg in kernels.FP32_CONFIGS]
    winner = widths.index(max(widths))
    assert min(widths[:winner], default=max(widths)) < max(widths)  # narrower ones run first
    timed = stand_in_autotune_timer(monkeypatch, kernels._AUTOTUNED["fp32"], winner)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        s, t, p = make_inputs((70,), 96, 192, torch.float32, device, seed=9)
        row_sq, grad = kernels.projected_mse_fwd(s, t, p, 1.0, True, autotune=True)
    finally:
        torch.set_float32_matmul_precision(saved)
    assert timed() == len(widths), "the autotuner did not time every config"
    diff = s.double() - t.double() @ p.double()
    assert_close_to_reference(row_sq, (diff * diff).sum(1), torch.float32, "autotuned rows")
    assert_close_to_reference(grad, diff, torch.float32, "autotuned grad")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_backward_scales_the_forward_gradient_in_place(device, backend):
    """Gradient-in-forward: a plain backward hands the student the buffer the forward wrote."""
    s, t, p = make_inputs((10,), 12, 6, torch.float32, device)
    s.requires_grad_()
    loss, unit_grad = torch.ops.cex.projected_mse(s, t, p, "sum", backend, True)
    (loss * 2).backward()
    assert s.grad.data_ptr() == unit_grad.data_ptr()
    ref_s = s.detach().double().requires_grad_()
    (oracle.projected_mse(ref_s, t.double(), p.double(), "sum") * 2).backward()
    assert_close_to_reference(s.grad, ref_s.grad, torch.float32, "in-place grad")


def test_fwd_bwd_extra_memory_is_one_gradient():
    """Only the student's gradient is allocated (plus the kernel's row-block scratch, 256 KiB
    per thread): no zero gradient for the internal output, no copy in AccumulateGrad."""
    from cex_kernels.benchmarking.measure import peak_extra_memory
    s, t, p = make_inputs((16384,), 64, 64, torch.float32, "cpu")
    s.requires_grad_()

    def step():
        s.grad = None
        cex_kernels.projected_mse(s, t, p, backend="cpu").backward()

    grad_bytes = s.numel() * 4
    assert peak_extra_memory(step, "cpu") < 1.1 * grad_bytes
