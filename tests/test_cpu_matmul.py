"""The CPU GEMM the fused-linear driver and the cpu projected_mse use (``csrc/cpu/matmul.cpp``):
fp32 through oneDNN's matmul when PyTorch has it, ``torch.mm`` otherwise. Oracle: float64
products formed here. Every layout (contiguous, transposed, row-strided operands; strided
outputs), accumulation, odd and empty shapes, each dtype; the switches that turn oneDNN
off; and the ops' cpu cases rerun with MKL's GEMM."""
import os
import subprocess
import sys

import pytest
import torch

from cex_kernels import _backends
from conftest import rerun_cpu_cases_on_path

pytestmark = pytest.mark.skipif(_backends._C is None, reason="compiled extension not built")

HERE = os.path.dirname(os.path.abspath(__file__))


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t``'s values in another memory layout."""
    if how == "contiguous":
        return t.contiguous()
    if how == "transposed":  # the transpose of a row-major matrix
        return t.T.contiguous().T
    # rows padded: a row-strided view (oneDNN would copy it; the fallback takes it)
    wide = torch.full((t.shape[0], t.shape[1] + 5), float("nan"), dtype=t.dtype)
    wide[:, :t.shape[1]] = t
    return wide[:, :t.shape[1]]


LAYOUTS = ("contiguous", "transposed", "row_strided")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("a_layout", LAYOUTS)
@pytest.mark.parametrize("b_layout", LAYOUTS)
@pytest.mark.parametrize("out_layout", ("contiguous", "row_strided"))
@pytest.mark.parametrize("accumulate", [False, True])
def test_matches_float64_product(dtype, a_layout, b_layout, out_layout, accumulate):
    gen = torch.Generator().manual_seed(0)
    m, k, n = 37, 53, 29
    a64 = torch.randn(m, k, generator=gen, dtype=torch.float64)
    b64 = torch.randn(k, n, generator=gen, dtype=torch.float64)
    start64 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    a = _layout(a64.to(dtype), a_layout)
    b = _layout(b64.to(dtype), b_layout)
    out = _layout(start64.to(dtype), out_layout)
    before = out.clone()
    got = _backends.matmul_into(out, a, b, accumulate=accumulate)
    assert got.data_ptr() == out.data_ptr()  # written in place
    want = a.double() @ b.double() + (before.double() if accumulate else 0)
    scale = (a.double().abs() @ b.double().abs() + before.double().abs()).max()
    assert (out.double() - want).abs().max() <= TOL[dtype] * scale
    if out_layout == "row_strided":  # the padding between the rows is untouched
        assert out.as_strided((m, 5), (out.stride(0), 1), out.shape[1]).isnan().all()


@pytest.mark.parametrize("shape", [(0, 7, 5), (6, 0, 5), (6, 7, 0)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_empty(shape, accumulate):
    m, k, n = shape
    a, b = torch.ones(m, k), torch.ones(k, n)
    out = torch.full((m, n), 3.0)
    _backends.matmul_into(out, a, b, accumulate=accumulate)
    assert torch.equal(out, torch.full((m, n), 3.0 if accumulate else 0.0))


def test_large_fp32_product_is_exact_fp32():
    """The oneDNN route at a size where it runs its blocked kernels: an IEEE fp32 product
    (no bf16/tf32 shortcut), as accurate as torch.mm's."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(300, 1024, generator=gen)
    b = torch.randn(1024, 700, generator=gen)
    out = torch.empty(300, 700)
    _backends.matmul_into(out, a, b.T.contiguous().T)
    want = a.double() @ b.double()
    ours = (out.double() - want).abs().max()
    torch_mm = ((a @ b).double() - want).abs().max()
    assert ours <= 4 * torch_mm, (ours, torch_mm)
    assert ours < 1e-3  # |entries| ~ 32: bf16 inputs would err by ~0.1


def test_shapes_that_do_not_chain_are_refused():
    with pytest.raises(RuntimeError, match="do not chain"):
        _backends.matmul_into(torch.empty(3, 4), torch.empty(3, 5), torch.empty(6, 4))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch without oneDNN")
def test_onednn_route_follows_the_user_switch():
    import platform
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        pytest.skip("the oneDNN route is built on x86-64 Linux only")
    assert _backends.onednn_fp32_matmul()
    torch.backends.mkldnn.enabled = False
    try:
        assert not _backends.onednn_fp32_matmul()
    finally:
        torch.backends.mkldnn.enabled = True
    assert _backends.onednn_fp32_matmul()


def test_environment_variable_turns_onednn_off():
    code = ("from cex_kernels import _backends; import torch;"
            "o = torch.empty(3, 2); _backends.matmul_into(o, torch.ones(3, 4), torch.ones(4, 2));"
            "print(_backends.onednn_fp32_matmul(), float(o.sum()))")
    env = dict(os.environ, CEX_DISABLE_ONEDNN="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "24.0"]


@pytest.mark.parametrize("test_file,select", [
    ("test_linear_kl.py", "cpu-cpu or cpu_one_chunk"),
    ("test_projected_mse.py", "cpu-cpu"),
])
def test_other_gemm_ops_on_mkl(test_file, select):
    """The linear_kl and projected_mse cpu cases, with fp32 products through torch.mm."""
    rerun_cpu_cases_on_path(os.path.join(HERE, test_file), "mkl_gemm", select=select)


def test_without_the_route_products_fall_back_to_torch(monkeypatch):
    """An extension built before the route existed (or none): torch.mm, same values."""
    monkeypatch.setattr(_backends, "_C", None)
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    out = torch.zeros(5, 3)
    _backends.matmul_into(out, a, b)
    _backends.matmul_into(out, a, b, accumulate=True)
    torch.testing.assert_close(out, 2 * (a @ b))
    assert not _backends.onednn_fp32_matmul()


@pytest.mark.parametrize("accumulate", [False, True])
def test_nan_and_inf_propagate_as_in_float64(accumulate):
    """NaN, inf and inf*0 reach exactly the entries they reach in a float64 product (the
    fp32 route is oneDNN's: a GEMM must not mask or spread them)."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(64, 96, generator=gen)
    b = torch.randn(96, 48, generator=gen)
    a[3, 5] = float("nan")
    a[10, 7] = float("inf")
    b[7, 4] = 0.0  # inf * 0 -> NaN in out[10, 4]
    b[20, 9] = float("-inf")
    start = torch.randn(64, 48, generator=gen)
    out = start.clone()
    _backends.matmul_into(out, a, b.T.contiguous().T, accumulate=accumulate)
    want = a.double() @ b.double() + (start.double() if accumulate else 0)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.isinf(), want.isinf())
    assert torch.equal(out[out.isinf()].sign(), want[want.isinf()].sign().float())
    finite = want.isfinite()
    assert (out.double()[finite] - want[finite]).abs().max() < 1e-3
