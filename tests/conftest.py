"""Shared test setup: which (device, backend) pairs to run, and one tolerance table.

Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter, which must
be switched on before cex_kernels (and so the @triton.jit kernels) is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cex_kernels  # noqa: E402
from cex_kernels import _backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Tolerances for comparing against the float64 reference computed from the same (rounded)
# inputs: fp32 accumulation everywhere, so the error comes from the output rounding and
# the order of summation. rtol is relative to the largest magnitude compared.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=4e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=1e-4),
}


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype, what=""):
    """Compare against a float64 reference, scaling atol by the reference's magnitude."""
    tol = TOLERANCES[dtype]
    expected = expected.detach().to(torch.float64).cpu()
    actual = actual.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"],
                               atol=tol["atol"] + tol["rtol"] * scale,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def backend_cases():
    """(device, backend) pairs that can run here, each a pytest param with an id."""
    available = cex_kernels.backends()
    cases = [("cpu", "reference")]
    if available["cpu"]:
        cases.append(("cpu", "cpu"))
    if available["triton"] and _backends.TRITON_INTERPRET:
        cases.append(("cpu", "triton"))
    if HAS_CUDA:
        cases.append(("cuda", "reference"))
        if available["triton"]:
            cases.append(("cuda", "triton"))
        if available["cuda"]:
            cases.append(("cuda", "cuda"))
    return [pytest.param(d, b, id=f"{d}-{b}") for d, b in cases]


def skip_unsupported(device: str, backend: str, dtype: torch.dtype):
    """Skip combinations a backend does not claim to support (or the interpreter gets wrong)."""
    if dtype == torch.float64 and backend in ("triton", "cuda"):
        pytest.skip(f"{backend} supports fp32/fp16/bf16 only")
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (triton issue 11584); "
                    "bf16 Triton runs in the CUDA test run")


# Resource-usage tables from the ahead-of-time compile tests, printed in the summary.
RESOURCE_REPORTS = []


def pytest_terminal_summary(terminalreporter):
    if RESOURCE_REPORTS:
        terminalreporter.section("GPU code: ahead-of-time compile resource usage")
        for report in RESOURCE_REPORTS:
            terminalreporter.write_line(report)
            terminalreporter.write_line("")
