"""The backend registry: "auto" picks per op, a backend may implement only some ops, and the
registry's answers are what the ops, tests and benchmarks use."""
import types

import pytest
import torch

import cex_kernels
from cex_kernels import _backends
from cex_kernels._backends import Backend


@pytest.fixture
def fake_backend():
    """A backend registered first in "auto" order that implements only projected_mse on
    fp32 CPU tensors (its kernel: float64 eager math, counting its calls)."""
    calls = []

    def projected_mse(student, teacher, projection, grad_scale, compute_grad):
        calls.append(tuple(student.shape))
        diff = student.double() - teacher.double() @ projection.double()
        grad = (diff * grad_scale).to(student.dtype) if compute_grad else student.new_empty((0,))
        return (diff * diff).sum(-1).float(), grad

    adapter = types.SimpleNamespace(projected_mse=projected_mse)
    _backends.register(Backend("fake", adapter, ("projected_mse",), devices=("cpu",),
                               auto_devices=("cpu",), dtypes=(torch.float32,),
                               problem=lambda: None, unit_inner_stride=False), first=True)
    try:
        yield calls
    finally:
        _backends.unregister("fake")


def _mse_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(5, 4, generator=g, dtype=dtype), torch.randn(5, 3, generator=g, dtype=dtype),
            torch.randn(3, 4, generator=g, dtype=dtype))


def test_auto_uses_a_partial_backend_only_for_the_ops_it_implements(fake_backend):
    s, t, p = _mse_inputs()
    s.requires_grad_(True)
    loss = cex_kernels.projected_mse(s, t, p)
    assert fake_backend == [(5, 4)], "auto should pick the first backend implementing the op"
    loss.backward()
    diff = s.detach().double() - t.double() @ p.double()
    torch.testing.assert_close(loss.double(), (diff ** 2).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.grad.double(), 2 * diff / diff.numel(), rtol=1e-6, atol=1e-9)
    # softmax_kl, jsd and linear_kl run a kernel the fake lacks: "auto" skips it (no KeyError).
    logits = torch.randn(3, 7)
    for fn in (cex_kernels.softmax_kl, cex_kernels.jsd):
        want = fn(logits, logits.flip(0), backend="reference")
        torch.testing.assert_close(fn(logits, logits.flip(0)), want)
    w = torch.randn(7, 4)
    cex_kernels.linear_kl(torch.randn(3, 4), w, logits)
    assert _backends.resolve_backend("softmax_kl", "auto", torch.device("cpu"),
                                     torch.float32) != "fake"
    assert fake_backend == [(5, 4)]


def test_auto_skips_a_backend_without_the_dtype(fake_backend):
    s, t, p = _mse_inputs(torch.float64)
    cex_kernels.projected_mse(s, t, p)
    assert fake_backend == []


def test_naming_a_backend_for_an_op_it_lacks_is_a_value_error(fake_backend):
    logits = torch.randn(3, 7)
    with pytest.raises(ValueError, match="'fake' does not implement softmax_kl"):
        cex_kernels.softmax_kl(logits, logits, backend="fake")
    with pytest.raises(TypeError, match="'fake' supports float32, got float64"):
        cex_kernels.projected_mse(*_mse_inputs(torch.float64), backend="fake")


def test_registration_shows_in_backends_and_can_be_undone(fake_backend):
    assert cex_kernels.backends()["fake"] is True
    with pytest.raises(ValueError, match="already registered"):
        _backends.register(_backends.get("fake"))
    entry = _backends.unregister("fake")
    try:
        assert "fake" not in cex_kernels.backends()
        with pytest.raises(ValueError, match="unknown backend 'fake'"):
            cex_kernels.projected_mse(*_mse_inputs(), backend="fake")
    finally:
        _backends.register(entry, first=True)


def test_backends_keeps_its_four_names_in_order():
    assert list(cex_kernels.backends()) == ["triton", "cuda", "cpu", "reference"]


def test_triton_version_is_read_without_importing_triton():
    """The registry reads Triton's version from package metadata; it is the module's own."""
    if _backends.TRITON_VERSION_STRING is None:
        assert _backends.unavailable_reason("triton").startswith("triton is not installed")
        return
    import triton
    assert _backends.TRITON_VERSION_STRING == triton.__version__
