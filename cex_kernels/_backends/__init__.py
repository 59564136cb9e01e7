"""The backend registry: the one place that knows which backend runs which kernel, where.

A *backend* is a set of kernels with one calling convention per kernel slot. Each is one
:class:`Backend` record in :data:`REGISTRY` (in ``backend="auto"`` preference order):

* ``triton`` (``_backends/triton.py``): CUDA tensors, CPU tensors under the Triton
  interpreter; fp32, fp16, bf16.
* ``cuda`` (``_backends/cuda.py``): CUDA tensors; fp32, fp16, bf16.
* ``cpu`` (``_backends/cpu.py``): CPU tensors; fp32, fp16, bf16, fp64.
* ``reference`` (``_backends/reference.py``): any device; fp32, fp16, bf16, fp64.

Kernel slots (each with one contract, written next to the op that calls it):

* ``projected_mse``: ``fwd(student2d, teacher2d, projection, grad_scale, compute_grad) ->
  (row_sq_err, grad)`` (``ops/projected_mse.py``);
* ``softmax_kl``: the per-row divergence ``fwd(student2d, teacher2d, row_weight,
  inv_temperature, beta, symmetric, grad_student, grad_teacher) -> (row_loss, grad_student,
  grad_teacher)`` (``ops/_divergence.py``); ``softmax_kl``, ``jsd`` and ``linear_kl`` run it
  (:data:`KERNEL_OF`);
* ``tvd``: the per-row total variation distance ``fwd(student2d, teacher2d, row_weight,
  inv_temperature, grad_student, grad_teacher) -> (row_loss, grad_student, grad_teacher)``
  (``ops/tvd.py``); ``tvd`` and ``linear_tvd`` run it. The cuda backend does not implement
  it (``backend="auto"`` skips cuda for it; ``backend="cuda"`` is a ValueError).

A backend whose record sets ``grad_into_logits`` also takes ``grad_student_out=`` in its
``softmax_kl`` and ``tvd`` slots: the tensor to write the student's gradient into, which may
be the student logits themselves (the fused-linear driver overwrites each chunk's logits
with their gradient, so a chunk needs one (rows, V) buffer, not two).

The ops ask the registry three things: :func:`resolve_backend` (``"auto"`` or a name ->
a backend that implements the op's kernel for these tensors, or a clear error),
:func:`kernel` (the callable) and :func:`needs_unit_inner_stride` (whether rows must be
contiguous along the last dimension). The tests' backend matrix (``tests/conftest.py``),
the benchmarks (``benchmarking/spec.py``) and ``cex backends`` ask it too.

**Adding a kernel to a backend** (e.g. a new op's kernel slot ``tvd``): define a function
``tvd`` with the slot's contract in the backend's adapter module and add ``"tvd"`` to that
backend's ``kernels`` below; a public op whose name differs from its slot gets one
:data:`KERNEL_OF` entry. ``backend="auto"`` then picks, per device and dtype, the first
available backend that implements it; backends that do not are skipped (and naming one
explicitly is a ``ValueError``).

**Adding a backend**: one :class:`Backend` entry here (or :func:`register` at run time),
one adapter module defining a function per kernel slot it implements, and its kernel
sources. Nothing else names backends.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

# --- what this install has ----------------------------------------------------------------


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
# Distributions that install the `triton` module (PyTorch nightlies ship "pytorch-triton").
_TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-xpu")


def _read_triton_version() -> Optional[str]:
    """Triton's version from package metadata, without importing it (0.2-0.7 s); None
    when the module is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    for dist in _TRITON_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import triton  # a source install without metadata: ask the module itself
    return triton.__version__


TRITON_VERSION_STRING = _read_triton_version()
TRITON_VERSION = (tuple(int(p) for p in TRITON_VERSION_STRING.split(".")[:2] if p.isdigit())
                  if TRITON_VERSION_STRING else None)

# The Triton interpreter is chosen when the kernels are decorated, i.e. at import time.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_problem() -> Optional[str]:
    if TRITON_VERSION is None:
        return "triton is not installed (`pip install 'triton>=3.6'`)"
    if TRITON_VERSION < MIN_TRITON:
        return (f"triton {TRITON_VERSION_STRING} is older than 3.6, which the Triton kernels "
                "need (torch < 2.10 pins an older Triton; the cuda and cpu backends do not "
                "need it)")
    return None


def _compiled_problem() -> Optional[str]:
    if _C is not None:
        return None
    if _other_torch is not None:
        return f"the compiled extension cex_kernels._C is not usable: {_C_IMPORT_ERROR}"
    return (f"the compiled extension cex_kernels._C failed to import ({_C_IMPORT_ERROR}); "
            "build it with `pip install --no-build-isolation -e .`")


def _cuda_problem() -> Optional[str]:
    if _C is None:
        return _compiled_problem()
    if not getattr(_C, "with_cuda", False):
        return ("cex_kernels._C was built without CUDA (no nvcc or a CPU PyTorch at build "
                "time); rebuild with CEX_FORCE_CUDA=1 on a CUDA machine")
    return None


# --- the registry -------------------------------------------------------------------------

HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
ALL_FLOATS = HALF_AND_FLOAT + (torch.float64,)
ANY_DEVICE = "any"


@dataclass(frozen=True)
class Backend:
    """One backend.

    ``adapter``: the module (dotted name, or a module object) defining one function per
    kernel slot in ``kernels``, imported on first use. ``devices``: the tensor device types
    it accepts (``"any"``: all); ``auto_devices``: those where ``backend="auto"`` may pick
    it. ``problem``: why it cannot run in this install (None: it can). ``unit_inner_stride``:
    its kernels index rows with one stride, so the last dimension must be contiguous.
    ``device_note``: appended to the error for tensors on a device it does not accept.
    ``note``: what it is, for ``cex backends``; ``label``: its name in benchmark reports.
    ``grad_into_logits``: its softmax_kl and tvd slots take ``grad_student_out=`` (see the
    module docstring).
    """
    name: str
    adapter: Union[str, types.ModuleType]
    kernels: Tuple[str, ...]
    devices: Tuple[str, ...]
    auto_devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    problem: Callable[[], Optional[str]]
    unit_inner_stride: bool
    note: str = ""
    device_note: str = ""
    label: str = ""
    grad_into_logits: bool = False

    def accepts(self, device_type: str, devices=None) -> bool:
        devices = self.devices if devices is None else devices
        return ANY_DEVICE in devices or device_type in devices


REGISTRY: List[Backend] = [
    Backend("triton", "cex_kernels._backends.triton", ("projected_mse", "softmax_kl", "tvd"),
            devices=("cuda", "cpu") if TRITON_INTERPRET else ("cuda",), auto_devices=("cuda",),
            dtypes=HALF_AND_FLOAT, problem=_triton_problem, unit_inner_stride=False,
            note="Triton kernels: CUDA tensors; CPU tensors only in the Triton interpreter "
                 "(TRITON_INTERPRET=1, slow: for tests)", label="cex Triton",
            device_note=" (CPU tensors run only under the Triton interpreter: set "
                        "TRITON_INTERPRET=1 before importing cex_kernels)"),
    Backend("cuda", "cex_kernels._backends.cuda", ("projected_mse", "softmax_kl"),
            devices=("cuda",), auto_devices=("cuda",), dtypes=HALF_AND_FLOAT,
            problem=_cuda_problem, unit_inner_stride=True,
            note="the compiled CUDA kernels (cex_kernels._C): CUDA tensors", label="cex CUDA"),
    Backend("cpu", "cex_kernels._backends.cpu", ("projected_mse", "softmax_kl", "tvd"),
            devices=("cpu",), auto_devices=("cpu",), dtypes=ALL_FLOATS,
            problem=_compiled_problem, unit_inner_stride=True, grad_into_logits=True,
            note="the compiled C++ kernels (cex_kernels._C): CPU tensors", label="cex C++"),
    Backend("reference", "cex_kernels._backends.reference",
            ("projected_mse", "softmax_kl", "tvd"),
            devices=(ANY_DEVICE,), auto_devices=(ANY_DEVICE,), dtypes=ALL_FLOATS,
            problem=lambda: None, unit_inner_stride=False,
            note="eager PyTorch, any device"),
]

# Public ops whose kernel slot has another name (every other op's slot is its own name).
KERNEL_OF = {"jsd": "softmax_kl", "linear_kl": "softmax_kl", "linear_tvd": "tvd"}


def register(backend: Backend, *, first: bool = False) -> None:
    """Add ``backend`` (last in ``"auto"``'s preference order, or ``first``). A name that
    is registered already is a ValueError: :func:`unregister` it first."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register: expected a Backend, got {type(backend).__name__}")
    if backend.name in names() or backend.name == "auto":
        raise ValueError(f"register: a backend named {backend.name!r} is already registered")
    REGISTRY.insert(0 if first else len(REGISTRY), backend)


def unregister(name: str) -> Backend:
    """Remove the backend called ``name`` and return its record."""
    entry = get(name)
    REGISTRY.remove(entry)
    return entry


def names() -> Tuple[str, ...]:
    return tuple(b.name for b in REGISTRY)


def get(name: str) -> Backend:
    for entry in REGISTRY:
        if entry.name == name:
            return entry
    raise KeyError(name)


def backends() -> Dict[str, bool]:
    """What this install can run: ``{name: bool}`` for every backend.

    ``cuda`` is True when the CUDA kernels were compiled into ``cex_kernels._C`` (a GPU is
    still needed to run them); ``triton`` when Triton 3.6 or newer is installed (it runs on
    CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``).
    """
    return {b.name: b.problem() is None for b in REGISTRY}


def unavailable_reason(name: str) -> str:
    """Why backend ``name`` cannot run in this install ("" when it can)."""
    return get(name).problem() or ""


def kernel_of(op: str) -> str:
    """The kernel slot public op ``op`` runs."""
    return KERNEL_OF.get(op, op)


def implementing(kernel: str) -> Tuple[str, ...]:
    """Names of the registered backends that implement kernel slot ``kernel``."""
    return tuple(b.name for b in REGISTRY if kernel in b.kernels)


def check_backend_name(op: str, backend) -> str:
    choices = ("auto",) + names()
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"cex_kernels.{op}: unknown backend {backend!r}; expected one of "
                         f"{choices}")
    return backend


def _dtype_list(dtypes) -> str:
    listed = [str(d).replace("torch.", "") for d in dtypes]
    return listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]


def problem_with(name: str, device: torch.device, dtype: Optional[torch.dtype] = None, *,
                 kernel: Optional[str] = None, op: Optional[str] = None,
                 devices: Optional[Tuple[str, ...]] = None):
    """Why backend ``name`` cannot run ``kernel`` on tensors of this device and dtype, as
    ``(exception type, message)``, or None when it can. ``devices`` overrides the device
    types it accepts (the benchmarks pass ``auto_devices``: no interpreter timings)."""
    entry = get(name)
    prefix = f"cex_kernels.{op}: " if op else ""
    if kernel is not None and kernel not in entry.kernels:
        others = [n for n in implementing(kernel) if n != name]
        return ValueError, (f"{prefix}backend {name!r} does not implement "
                            f"{op or kernel}; backends that do: {tuple(others)}")
    # The tensors' device first: a mismatch is the caller's error whatever was built.
    if not entry.accepts(device.type, devices):
        wanted = " or ".join(d.upper() for d in entry.auto_devices)
        return ValueError, (f"{prefix}backend {name!r} needs {wanted} tensors, got {device}"
                            + (entry.device_note if devices is None else ""))
    problem = entry.problem()
    if problem is not None:
        return RuntimeError, f"{prefix}backend {name!r} is not available: {problem}"
    if dtype is not None and dtype not in entry.dtypes:
        others = [b.name for b in REGISTRY if dtype in b.dtypes
                  and (kernel is None or kernel in b.kernels)]
        hint = " or ".join(repr(n) for n in others)
        return TypeError, (f"{prefix}backend {name!r} supports {_dtype_list(entry.dtypes)}, "
                           f"got {_dtype_list([dtype])}"
                           + (f" (use backend={hint})" if hint else ""))
    return None


def resolve_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype, *,
                    kernel: Optional[str] = None) -> str:
    """Turn ``backend`` ("auto" or a name) into a backend that can run ``op`` (its kernel
    slot ``kernel``, by default :func:`kernel_of` ``op``) on these tensors.

    ``"auto"``: the first backend in registry order that is available, implements the
    kernel, may be picked automatically on this device type and supports the dtype. A
    named backend that cannot run it raises a ValueError (device, or a kernel it lacks),
    RuntimeError (not available here) or TypeError (dtype) naming the reason.
    """
    check_backend_name(op, backend)
    kernel = kernel or kernel_of(op)
    if backend == "auto":
        for entry in REGISTRY:
            if problem_with(entry.name, device, dtype, kernel=kernel,
                            devices=entry.auto_devices) is None:
                return entry.name
        raise RuntimeError(f"cex_kernels.{op}: no registered backend runs {kernel} on "
                           f"{device.type} tensors of dtype {dtype}; registered: {names()}")
    problem = problem_with(backend, device, dtype, kernel=kernel, op=op)
    if problem is not None:
        exc, message = problem
        raise exc(message)
    return backend


def _adapter(entry: Backend):
    if isinstance(entry.adapter, str):
        return importlib.import_module(entry.adapter)
    return entry.adapter


def kernel(backend: str, slot: str) -> Callable:
    """The callable of kernel slot ``slot`` in ``backend`` (resolved by
    :func:`resolve_backend` first, so it exists)."""
    return getattr(_adapter(get(backend)), slot)


def needs_unit_inner_stride(backend: str) -> bool:
    return get(backend).unit_inner_stride


def empty_for_writing(shape, like: torch.Tensor, dtype: Optional[torch.dtype] = None
                      ) -> torch.Tensor:
    """``like.new_empty(shape, dtype=dtype)``, on transparent huge pages when it is a large
    CPU buffer, the compiled extension is here and ``CEX_HUGE_PAGES=1`` (a fresh buffer's
    first writes otherwise fault once per 4 KiB page: ``csrc/cpu/huge_pages.h``). For
    buffers about to be written in full."""
    out = like.new_empty(shape, dtype=dtype)
    if out.device.type == "cpu" and _C is not None:
        _C.advise_huge_pages(out)
    return out


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                accumulate: bool = False) -> torch.Tensor:
    """``out = a @ b`` (``out += a @ b`` when ``accumulate``), returning ``out``. On the CPU
    with the compiled extension, fp32 products whose operands oneDNN reads in place (``out``
    contiguous; ``a``, ``b`` contiguous or transposed) run through oneDNN's matmul, faster
    than ``torch.mm``'s MKL sgemm here (``csrc/cpu/matmul.cpp``); otherwise ``torch.mm`` /
    ``addmm_``. Both are IEEE fp32 products. No autograd: for use inside the ops."""
    route = getattr(_C, "matmul_into_cpu", None)  # None: no extension, or one built before it
    if out.device.type == "cpu" and route is not None:
        route(out, a, b, accumulate)
        return out
    if accumulate:
        return out.addmm_(a, b)
    return torch.mm(a, b, out=out)


def onednn_fp32_matmul() -> bool:
    """Whether :func:`matmul_into` sends fp32 CPU products to oneDNN now (the extension is
    here, PyTorch has oneDNN and it is enabled, ``CEX_DISABLE_ONEDNN`` is not set)."""
    enabled = getattr(_C, "onednn_matmul_enabled", None)
    return enabled is not None and bool(enabled())
