"""Shared test setup: which (device, backend) pairs to run, and one tolerance table.

Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter, which must
be switched on before cex_kernels (and so the @triton.jit kernels) is imported.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cex_kernels  # noqa: E402
from cex_kernels import _backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _interpreter_broken_reason():
    """Why the Triton interpreter cannot run here, or None. Triton 3.6's interpreter turns
    a runtime integer into a Python int with ``int(array_of_one)``, which NumPy 2.4 made an
    error (Triton 3.7 squeezes the array first)."""
    if HAS_CUDA or not _backends.TRITON_INTERPRET or not cex_kernels.backends()["triton"]:
        return None
    import numpy
    import triton
    numpy_version = tuple(int(x) for x in numpy.__version__.split(".")[:2])
    if _backends.TRITON_VERSION < (3, 7) and numpy_version >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails on NumPy {numpy.__version__} "
                "(int() of a 1-element array); use numpy<2.4 or Triton >= 3.7 to run the "
                "Triton kernels on the CPU")
    return None


INTERPRETER_BROKEN = _interpreter_broken_reason()

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


def backend_cases(kernel: str = None):
    """(device, backend) pairs that can run here (for one kernel slot, or any), each a
    pytest param with an id; which backend runs where comes from the registry."""
    devices = ["cpu"] + (["cuda"] if HAS_CUDA else [])
    cases = [(d, b.name) for d in devices for b in _backends.REGISTRY
             if b.problem() is None and b.accepts(d) and (kernel is None or kernel in b.kernels)]

    def marks(device, backend):
        if device == "cpu" and backend == "triton" and INTERPRETER_BROKEN:
            return [pytest.mark.skip(reason=INTERPRETER_BROKEN)]
        return []
    return [pytest.param(d, b, id=f"{d}-{b}", marks=marks(d, b)) for d, b in cases]


def triton_device():
    """Where the Triton kernels run in this session: "cuda", "cpu" (the interpreter), or
    None (Triton missing); tests that launch kernels directly use this."""
    if not cex_kernels.backends()["triton"]:
        return None
    if HAS_CUDA:
        return "cuda"
    return "cpu" if _backends.TRITON_INTERPRET and not INTERPRETER_BROKEN else None


@contextlib.contextmanager
def math_mode_dtypes(mode: str, device: str):
    """For a kernel math mode ("tensor_core", "tf32", "fp32"): set torch's float32 matmul
    precision to select it and yield the dtypes to test it with, each with the dtype whose
    tolerance applies (TF32 rounds operands to 10-bit mantissas: bf16-like input error).
    bf16 is left out under the interpreter, whose bf16 tl.dot is wrong (triton issue 11584)."""
    dtypes = {"tensor_core": [torch.float16, torch.bfloat16], "tf32": [torch.float32],
              "fp32": [torch.float32]}[mode]
    if device == "cpu":
        dtypes = [d for d in dtypes if d != torch.bfloat16]
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
    try:
        yield [(d, torch.bfloat16 if mode == "tf32" else d) for d in dtypes]
    finally:
        torch.set_float32_matmul_precision(saved)


def stand_in_autotune_timer(monkeypatch, tuner, winner: int):
    """Make ``tuner`` (a ``triton.autotune`` object) tune afresh with a timer that runs each
    config once and reports config number ``winner`` fastest, on any device: the
    interpreter has no GPU timer. Returns a callable giving the configs timed so far."""
    timed = []

    def timer(kernel_call, quantiles=None):
        kernel_call()
        timed.append(len(timed))
        ms = 1.0 if timed[-1] == winner else 5.0
        return [ms, ms, ms]

    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.delitem(tuner.__dict__, "do_bench", raising=False)  # a cached timer
    monkeypatch.setattr(tuner, "_do_bench", timer)
    return lambda: len(timed)


def no_triton_reason():
    """Why ``triton_device()`` is None (for skipif reasons)."""
    return INTERPRETER_BROKEN or "Triton is not installed or cannot run here"


def skip_unsupported(device: str, backend: str, dtype: torch.dtype):
    """Skip combinations a backend does not claim to support (or the interpreter gets wrong)."""
    if dtype not in _backends.get(backend).dtypes:
        pytest.skip(f"{backend} does not support {dtype}")
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (triton issue 11584); "
                    "bf16 Triton runs in the CUDA test run")


def free_port() -> int:
    """A free TCP port on the loopback interface (for a test's torch.distributed store)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The CPU backend's SIMD paths, each forced by an environment variable (csrc/cpu/softmax_kl.cpp):
# the tests run in-process on the widest the machine has; these rerun them on the others.
CPU_PATHS = {"portable": {"CEX_DISABLE_AVX2": "1"}, "avx2": {"CEX_DISABLE_AVX512": "1"}}
# fp32 CPU products through torch.mm (MKL) instead of oneDNN (csrc/cpu/matmul.cpp)
GEMM_PATHS = {"mkl_gemm": {"CEX_DISABLE_ONEDNN": "1"}}


def rerun_cpu_cases_on_path(test_file: str, path: str, select: str = "cpu-cpu") -> None:
    """The CPU backend picks its SIMD path (and its fp32 GEMM) once per process: rerun
    ``test_file``'s ``select`` cases (pytest -k) in a subprocess with ``path`` forced (a
    :data:`CPU_PATHS` key: the baseline-ISA portable path, or AVX2 without AVX-512; or a
    :data:`GEMM_PATHS` key: MKL's fp32 GEMM instead of oneDNN's)."""
    import subprocess
    import sys
    if not cex_kernels.backends()["cpu"]:
        pytest.skip("compiled extension not built")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **{**CPU_PATHS, **GEMM_PATHS}[path])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           os.path.abspath(test_file), "-k",
                           f"({select}) and not other_cpu_path and not portable_path and not other_gemm"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture
def one_thread():
    """One intra-op thread: for tiny models on a shared 2-core machine it is many times
    faster than two (modules use it with ``pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Resource-usage tables from the ahead-of-time compile tests, printed in the summary when
# asked for (--resource-usage): registers, spills and shared memory per kernel.
RESOURCE_REPORTS = []


def pytest_addoption(parser):
    parser.addoption("--resource-usage", action="store_true", default=False,
                     help="print the GPU kernels' register/shared-memory tables from the "
                          "ahead-of-time compile tests (-m aot) in the summary")


def pytest_terminal_summary(terminalreporter, config):
    if RESOURCE_REPORTS and config.getoption("--resource-usage"):
        terminalreporter.section("GPU code: ahead-of-time compile resource usage")
        for report in RESOURCE_REPORTS:
            terminalreporter.write_line(report)
            terminalreporter.write_line("")
