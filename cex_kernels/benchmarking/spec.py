"""The benchmark framework's building blocks: a grid cell (:class:`Case`), an op's benchmark
description (:class:`OpSpec`), repeat counts, ``torch.compile`` caching and roofline rates.

The op grids built from these live in ``benchmarking/grids/`` (one file per op, collected
in ``grids.OPS``); :mod:`~cex_kernels.benchmarking.report` runs them. Measurement is in
:mod:`~cex_kernels.benchmarking.measure`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

MODES = ("fwd", "fwd+bwd")

# Markdown columns an OpSpec can ask for (see report.report_markdown), in its order.
METRICS = ("flops", "gemm_fraction", "bandwidth", "bandwidth_fraction", "exp_fraction",
           "peak_memory", "memory_vs_eager", "speedup", "vs_compile")
# Of these, the columns shown only when some row has the figure (a row field of the same
# name): the exp limit is measured on the CPU only; "vs torch.compile" needs torch.compile
# in the cell.
OPTIONAL_METRICS = ("exp_fraction", "vs_compile")


@dataclass(frozen=True)
class Case:
    """One benchmark cell's problem: an op on one shape, dtype, mode (and input variant)."""
    op: str
    shape: Tuple[Tuple[str, int], ...]  # named sizes, e.g. (("N", 8192), ("d_t", 1024), ...)
    dtype: torch.dtype
    mode: str  # "fwd": no input needs a gradient; "fwd+bwd": forward + backward
    variant: str = ""  # how the inputs are given, e.g. linear_kl's "teacher_hidden"

    @property
    def sizes(self) -> dict:
        return dict(self.shape)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def __str__(self) -> str:  # also the pytest id
        variant = f"-{self.variant}" if self.variant else ""
        return ("-".join(f"{k}{v}" for k, v in self.shape)
                + f"{variant}-{self.dtype_name}-{self.mode}")


@dataclass(frozen=True)
class OpSpec:
    """How to benchmark one op: its grid, implementations, FLOPs/bytes and a timed step.

    ``skip_reason(impl, device)`` says why an implementation cannot run on a device (None:
    it runs); ``case_skip_reason(impl, case)`` the same for one cell (e.g. an impl that
    needs the teacher as hidden states). ``repeats``: (warm-up, timed calls) per device
    type for the full grid, where the default of :func:`default_repeats` is too slow.
    ``roofline``: "gemm" (compare with the measured peak GEMM rate) or "bandwidth"
    (memory-bound: compare with the measured copy bandwidth only). ``metrics``: the
    Markdown columns after the time (names in :data:`METRICS`). ``exps(case)``: the
    exponentials one call evaluates (a log1p counts as one), for the fraction of the
    measured exp rate (:func:`rates`); None where exponentials are not the op's cost.
    ``notes``: how FLOPs and bytes are counted, printed under the table.
    """
    name: str
    shapes: Dict[str, List[dict]]  # device type -> named sizes
    dtypes: Dict[str, Tuple[torch.dtype, ...]]
    impls: Tuple[str, ...]
    skip_reason: Callable[[str, torch.device], Optional[str]]
    make_inputs: Callable[[Case, torch.device], dict]
    make_step: Callable[[str, Case, dict], Callable[[], object]]
    flops: Callable[[Case], int]
    min_bytes: Callable[[Case], int]
    variants: Optional[Dict[str, Tuple[str, ...]]] = None  # device type -> variants
    case_skip_reason: Optional[Callable[[str, Case], Optional[str]]] = None
    repeats: Optional[Dict[str, Tuple[int, int]]] = None
    roofline: str = "gemm"
    metrics: Tuple[str, ...] = ("flops", "gemm_fraction", "peak_memory", "speedup",
                                "vs_compile")
    notes: str = ""
    exps: Optional[Callable[[Case], int]] = None

    def cases(self, device, *, quick: bool = False,
              dtypes: Optional[Sequence[torch.dtype]] = None,
              shapes: Optional[Sequence[dict]] = None) -> List[Case]:
        """The grid for ``device``; ``quick``: the smallest shape, first dtype and variant;
        ``shapes``: these named sizes instead of the op's grid."""
        kind = torch.device(device).type
        shapes = list(shapes or self.shapes[kind])
        dts = tuple(dtypes) if dtypes else self.dtypes[kind]
        variants = tuple((self.variants or {}).get(kind, ("",)))
        if quick:
            shapes = [min(shapes, key=lambda s: math.prod(s.values()))]
            dts, variants = dts[:1], variants[:1]
        return [Case(self.name, tuple(s.items()), dt, mode, variant)
                for s in shapes for variant in variants for dt in dts for mode in MODES]

    def cell_skip_reason(self, impl: str, case: Case, device) -> Optional[str]:
        """Why ``impl`` does not run this cell on ``device`` (None: it runs)."""
        reason = self.skip_reason(impl, torch.device(device))
        if reason is None and self.case_skip_reason is not None:
            reason = self.case_skip_reason(impl, case)
        return reason


def our_backends(kernel: str) -> Tuple[str, ...]:
    """The backends that implement kernel slot ``kernel`` (from the registry): the
    implementations of ours a grid compares."""
    from cex_kernels import _backends
    return _backends.implementing(kernel)


def impl_label(impl: str) -> str:
    """What a report calls an implementation: our backends by their registry label
    (``"cpu"`` -> ``"cex C++"``, ``"cpu/64MiB"`` -> ``"cex C++ (64MiB)"``), ``"ours"`` (the
    auto backend) as such; others unchanged."""
    from cex_kernels import _backends
    base, _, option = impl.partition("/")
    if base == "ours":
        label = "cex (auto backend)"
    else:
        label = _backends.get(base).label if base in _backends.names() else ""
    if not label:
        return impl
    return label + (f" ({option})" if option else "")


def backend_skip_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why one of our backends cannot be benchmarked on ``device`` (None: it can). Only
    where ``backend="auto"`` may pick it: the Triton interpreter is no benchmark."""
    from cex_kernels import _backends
    problem = _backends.problem_with(backend, torch.device(device),
                                     devices=_backends.get(backend).auto_devices)
    return None if problem is None else problem[1]


def liger_skip_reason(device: torch.device) -> Optional[str]:
    """Why Liger-Kernel cannot be benchmarked on ``device`` (None: it can)."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger_kernel is not installed (`pip install liger-kernel`; it needs CUDA)"
    if device.type != "cuda":
        return "Liger-Kernel's Triton kernels need a CUDA device"
    return None


def impl_skip_reason(impl: str, device: torch.device) -> Optional[str]:
    """Why implementation ``impl`` ("eager", "torch.compile", "liger", or one of our
    backends, optionally with an option after a slash: "cpu/64MiB") cannot run on
    ``device`` (None: it can)."""
    backend = impl.partition("/")[0]
    if backend in ("eager", "torch.compile", "reference"):
        return None
    if backend == "liger":
        return liger_skip_reason(device)
    return backend_skip_reason(backend, device)


def randn(shape, gen: torch.Generator, device, dtype: torch.dtype, scale: float = 1.0):
    """Standard normal inputs drawn in fp32 from ``gen`` (so every dtype sees the same
    values before rounding), times ``scale``."""
    out = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return (out * scale if scale != 1.0 else out).to(dtype)


def generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def clear_grads(inputs: dict) -> None:
    """``.grad = None`` on every input that requires grad, so the next call allocates it."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value.grad = None


_COMPILED = {}


def compiled(fn):
    """``torch.compile(fn, dynamic=False)``, built once per function.

    Every grid cell is a new shape/dtype/grad signature, so the recompile limit is raised
    (each cell compiles once, in the warm-up, and is then timed on its own specialization).
    """
    if fn not in _COMPILED:
        import torch._dynamo.config as dynamo_config
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, key):
                setattr(dynamo_config, key, max(getattr(dynamo_config, key), 64))
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def default_repeats(device, *, quick: bool = False,
                    spec: Optional[OpSpec] = None) -> Tuple[int, int]:
    """(warmup, repeats). Warm-up >= 1 always: torch.compile compiles in the first call.

    ``spec.repeats`` overrides the full-grid default for its device type (ops whose cells
    take seconds on the CPU); ``quick`` always uses the small default. ``repeats`` is the
    least number of timed calls: the interleaved timer goes on until its time budget is
    spent (``report.run_report``).
    """
    kind = torch.device(device).type
    if not quick and spec is not None and spec.repeats and kind in spec.repeats:
        return spec.repeats[kind]
    if kind == "cuda":
        return (3, 10) if quick else (10, 50)
    return (1, 5) if quick else (3, 15)


def rates(flops: int, min_bytes: int, seconds: float, peaks: dict, dtype_name: str,
          exps: Optional[int] = None) -> dict:
    """Achieved FLOP/s and bytes/s, and their fractions of the measured peaks (roofline);
    with ``exps`` (exponentials per call) also exponentials/s and, when ``peaks`` has the
    measured exp rate (``exp_per_s``: fp32, the precision every implementation computes
    its exponentials in; see ``measure.measure_peak_exp_rate``), ``exp_fraction`` of it."""
    out = {"flops_per_s": flops / seconds, "min_bytes_per_s": min_bytes / seconds}
    gemm = peaks.get(f"gemm_flops_per_s_{dtype_name}")
    bw = peaks.get("copy_bytes_per_s")
    if exps is not None:
        out["exps"] = exps
        out["exp_per_s"] = exps / seconds
        if peaks.get("exp_per_s"):
            out["exp_fraction"] = out["exp_per_s"] / peaks["exp_per_s"]
    if gemm:
        out["gemm_peak_fraction"] = out["flops_per_s"] / gemm
    if bw:
        out["bandwidth_fraction"] = out["min_bytes_per_s"] / bw
    if gemm and bw:  # roofline: min(compute peak, intensity * bandwidth)
        bound = min(gemm, flops / max(min_bytes, 1) * bw)
        out["roofline_bound_flops_per_s"] = bound
        out["roofline_fraction"] = out["flops_per_s"] / bound
    elif bw and not gemm:  # memory-bound op measured against the copy bandwidth only
        out["roofline_fraction"] = out["bandwidth_fraction"]
    return out


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
