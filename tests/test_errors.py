"""Bad input gets a clear ValueError/TypeError naming what was wrong, before any kernel runs."""
import pytest
import torch

import cex_kernels


def ok_inputs(dtype=torch.float32):
    return torch.randn(5, 4, dtype=dtype), torch.randn(5, 6, dtype=dtype), torch.randn(6, 4, dtype=dtype)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_mismatched_leading_dims(backend):
    s, t, p = ok_inputs()
    with pytest.raises(ValueError, match=r"\(5, 4\).*\(4, 6\)"):
        cex_kernels.projected_mse(s, t[:4], p, backend=backend)
    with pytest.raises(ValueError, match="leading"):
        cex_kernels.projected_mse(s.reshape(5, 1, 4), t, p, backend=backend)


def test_projection_of_wrong_shape_names_expected_shape():
    s, t, p = ok_inputs()
    with pytest.raises(ValueError, match=r"\(6, 4\).*got \(4, 6\)"):
        cex_kernels.projected_mse(s, t, p.T)
    with pytest.raises(ValueError, match="projection"):
        cex_kernels.projected_mse(s, t, p[:5])


def test_integer_and_mixed_dtypes():
    s, t, p = ok_inputs()
    with pytest.raises(TypeError, match="int64"):
        cex_kernels.projected_mse(s, t.long(), p)
    with pytest.raises(TypeError, match=r"student=torch.float32.*teacher=torch.bfloat16"):
        cex_kernels.projected_mse(s, t.bfloat16(), p)
    with pytest.raises(TypeError, match="torch.Tensor"):
        cex_kernels.projected_mse(s.tolist(), t, p)


def test_different_devices():
    s, t, p = ok_inputs()
    with pytest.raises(ValueError, match="meta"):
        cex_kernels.projected_mse(s, t.to("meta"), p)


def test_bad_reduction_and_backend():
    s, t, p = ok_inputs()
    with pytest.raises(ValueError, match="reduction"):
        cex_kernels.projected_mse(s, t, p, reduction="batchmean")
    with pytest.raises(ValueError, match="unknown backend"):
        cex_kernels.projected_mse(s, t, p, backend="mkl")


def test_backend_device_mismatch():
    # CPU tensors with backend="cuda" are the caller's mistake whether or not CUDA was built.
    s, t, p = ok_inputs()
    with pytest.raises(ValueError, match="CUDA tensors"):
        cex_kernels.projected_mse(s, t, p, backend="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        cex_kernels.softmax_kl(s, s, backend="cuda")


def test_float64_on_gpu_backends_is_a_type_error():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    s, t, p = (x.double().cuda() for x in ok_inputs())
    with pytest.raises(TypeError, match="float64"):
        cex_kernels.projected_mse(s, t, p, backend="triton")


def test_auto_picks_compiled_cpu_backend():
    from cex_kernels._backends import resolve_backend
    expected = "cpu" if cex_kernels.backends()["cpu"] else "reference"
    assert resolve_backend("projected_mse", "auto", torch.device("cpu"), torch.float32) == expected


def test_backends_report():
    report = cex_kernels.backends()
    assert set(report) == {"triton", "cuda", "cpu", "reference"}
    assert report["reference"] is True
    assert report["cpu"] is True, "the C++ extension should always be built"
