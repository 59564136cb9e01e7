"""Which backends exist in this install, and how ``backend="auto"`` chooses among them.

Backends: ``triton`` (Triton kernels; CUDA tensors, or CPU tensors when the Triton
interpreter is on: ``TRITON_INTERPRET=1`` set before import), ``cuda`` (the compiled
``.cu`` kernels in ``cex_kernels._C``), ``cpu`` (the compiled C++ kernels) and
``reference`` (eager PyTorch; always available, also the float64 ground truth).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")

def _built_for_another_torch():
    """The torch version the extension was built against, when it is not the one running
    (the binary then fails on a missing symbol, or crashes later): else None."""
    try:
        from cex_kernels._build_info import TORCH_VERSION
    except ImportError:  # built by an older setup.py, or never built
        return None
    return TORCH_VERSION if TORCH_VERSION != torch.__version__ else None


_C = None
_other_torch = _built_for_another_torch()
if _other_torch is not None:
    _C_IMPORT_ERROR = (f"it was built against torch {_other_torch} but torch {torch.__version__} "
                       "is installed; rebuild it against this torch "
                       "(`pip install --no-build-isolation -e .` or `bash scripts/setup.sh`)")
    import warnings
    warnings.warn(f"cex_kernels: the compiled kernels are disabled: {_C_IMPORT_ERROR}. Until "
                  "then backend='auto' falls back to the eager reference backend on the CPU.",
                  RuntimeWarning, stacklevel=2)
else:
    try:
        from cex_kernels import _C  # noqa: F401  (compiled extension)
    except ImportError as _exc:  # a source checkout that was never built
        _C_IMPORT_ERROR = str(_exc)
    else:
        _C_IMPORT_ERROR = ""

# The Triton kernels need Triton 3.6 or newer (the language and compiler APIs they use).
# torch < 2.10 pins an older Triton for its own compiler, and a newer one breaks that
# torch's torch.compile, so an older Triton is left alone: the triton backend is then
# unavailable and "auto" uses the cuda and cpu kernels.
MIN_TRITON = (3, 6)
try:
    import triton
except ImportError:
    _HAS_TRITON = False
    _TRITON_PROBLEM = "triton is not installed (`pip install 'triton>=3.6'`)"
else:
    _triton_version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    _HAS_TRITON = _triton_version >= MIN_TRITON
    _TRITON_PROBLEM = (f"triton {triton.__version__} is older than 3.6, which the Triton "
                       "kernels need (torch < 2.10 pins an older Triton; the cuda and cpu "
                       "backends do not need it)")

# The Triton interpreter is chosen when the kernels are decorated, i.e. at import time.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends() -> dict:
    """What this install can run: ``{name: bool}`` for every backend.

    ``cuda`` is True when the CUDA kernels were compiled into ``cex_kernels._C`` (a GPU is
    still needed to run them); ``triton`` when Triton 3.6 or newer imports (it runs on CUDA
    tensors, or on CPU tensors under ``TRITON_INTERPRET=1``).
    """
    return {
        "triton": _HAS_TRITON,
        "cuda": bool(_C is not None and getattr(_C, "with_cuda", False)),
        "cpu": _C is not None,
        "reference": True,
    }


def _unavailable_reason(name: str) -> str:
    if name in ("cpu", "cuda") and _C is None:
        return (f"the compiled extension cex_kernels._C is not usable: {_C_IMPORT_ERROR}"
                if _other_torch is not None else
                f"the compiled extension cex_kernels._C failed to import ({_C_IMPORT_ERROR}); "
                "build it with `pip install --no-build-isolation -e .`")
    if name == "cuda":
        return ("cex_kernels._C was built without CUDA (no nvcc or a CPU PyTorch at build "
                "time); rebuild with CEX_FORCE_CUDA=1 on a CUDA machine")
    if name == "triton":
        return _TRITON_PROBLEM
    return "unknown reason"


def check_backend_name(op: str, backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS + ("auto",):
        raise ValueError(f"cex_kernels.{op}: unknown backend {backend!r}; expected one of "
                         f"{('auto',) + BACKENDS}")
    return backend


def resolve_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn ``backend`` ("auto" or a name) into a backend that can run ``op`` on these tensors."""
    check_backend_name(op, backend)
    available = backends()
    if backend == "auto":
        if device.type == "cuda":
            order = ("triton", "cuda", "reference")
        elif device.type == "cpu":
            order = ("cpu", "reference")
        else:
            order = ("reference",)
        for name in order:
            if available[name] and (dtype != torch.float64 or name in ("cpu", "reference")):
                return name
        return "reference"
    # The tensors' device first: a mismatch is the caller's error whatever was built.
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"cex_kernels.{op}: backend 'cpu' needs CPU tensors, got {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"cex_kernels.{op}: backend 'cuda' needs CUDA tensors, got {device}")
    if not available[backend]:
        raise RuntimeError(f"cex_kernels.{op}: backend {backend!r} is not available: "
                           + _unavailable_reason(backend))
    if backend == "triton" and device.type != "cuda" and not (TRITON_INTERPRET and device.type == "cpu"):
        raise ValueError(f"cex_kernels.{op}: backend 'triton' needs CUDA tensors, got {device} "
                         "(CPU tensors run only under the Triton interpreter: set "
                         "TRITON_INTERPRET=1 before importing cex_kernels)")
    if backend in ("triton", "cuda") and dtype == torch.float64:
        raise TypeError(f"cex_kernels.{op}: backend {backend!r} supports float32, float16 and "
                        "bfloat16, got float64 (use backend='cpu' or 'reference')")
    return backend
