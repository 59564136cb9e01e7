"""Benchmark grids per op and the report runner, shared by ``bench/`` and ``cex bench``.

Each :class:`OpSpec` (collected in :data:`OPS`) holds an op's shape grid, the
implementations compared, how to build inputs and one timed step, and its analytic FLOPs
and minimal bytes. ``bench/bench_<op>.py`` (pytest-benchmark) and ``bench/report.py`` /
``cex bench`` (JSON + Markdown, :func:`run_report`) read the grid from here, so they always
measure the same cases. Measurement itself is in :mod:`cex_kernels.bench_utils`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from cex_kernels.bench_utils import (MiB, device_name, environment, measure_peak_copy_bandwidth,
                                     measure_peak_gemm_flops, peak_extra_memory, time_fn)

MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    """One benchmark cell's problem: an op on one shape, dtype and mode."""
    op: str
    shape: Tuple[Tuple[str, int], ...]  # named sizes, e.g. (("N", 8192), ("d_t", 1024), ...)
    dtype: torch.dtype
    mode: str  # "fwd": no input needs a gradient; "fwd+bwd": forward + backward

    @property
    def sizes(self) -> dict:
        return dict(self.shape)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def __str__(self) -> str:  # also the pytest id
        return "-".join(f"{k}{v}" for k, v in self.shape) + f"-{self.dtype_name}-{self.mode}"


@dataclass(frozen=True)
class OpSpec:
    """How to benchmark one op: its grid, implementations, FLOPs/bytes and a timed step."""
    name: str
    shapes: Dict[str, List[dict]]  # device type -> named sizes
    dtypes: Dict[str, Tuple[torch.dtype, ...]]
    impls: Tuple[str, ...]
    skip_reason: Callable[[str, torch.device], Optional[str]]
    make_inputs: Callable[[Case, torch.device], dict]
    make_step: Callable[[str, Case, dict], Callable[[], object]]
    flops: Callable[[Case], int]
    min_bytes: Callable[[Case], int]

    def cases(self, device, *, quick: bool = False,
              dtypes: Optional[Sequence[torch.dtype]] = None) -> List[Case]:
        """The grid for ``device``; ``quick``: the smallest shape only, first dtype only."""
        kind = torch.device(device).type
        shapes = list(self.shapes[kind])
        dts = tuple(dtypes) if dtypes else self.dtypes[kind]
        if quick:
            shapes = [min(shapes, key=lambda s: math.prod(s.values()))]
            dts = dts[:1]
        return [Case(self.name, tuple(s.items()), dt, mode)
                for s in shapes for dt in dts for mode in MODES]


def eager_projected_mse(student, teacher, projection):
    """The eager baseline: materializes ``teacher @ projection``, then ``F.mse_loss``."""
    return F.mse_loss(student, teacher @ projection)


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


def _projected_mse_skip_reason(impl: str, device: torch.device) -> Optional[str]:
    from cex_kernels import backends
    if impl in ("eager", "torch.compile", "reference"):
        return None
    if not backends()[impl]:
        return f"backend {impl!r} is not available in this install"
    if impl == "cpu" and device.type != "cpu":
        return "backend 'cpu' runs on CPU tensors only"
    if impl in ("cuda", "triton") and device.type != "cuda":
        return f"backend {impl!r} needs a CUDA device (the Triton interpreter is no benchmark)"
    return None


def _projected_mse_inputs(case: Case, device: torch.device) -> dict:
    from cex_kernels import random_projection
    n, d_t, d_s = (case.sizes[k] for k in ("N", "d_t", "d_s"))
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(n, d_s, generator=gen).to(device=device, dtype=case.dtype)
    teacher = torch.randn(n, d_t, generator=gen).to(device=device, dtype=case.dtype)
    projection = random_projection(d_t, d_s, seed=0, dtype=case.dtype, device=device)
    student.requires_grad_(case.mode == "fwd+bwd")  # the curriculum-extraction case
    return {"student": student, "teacher": teacher, "projection": projection}


def _projected_mse_step(impl: str, case: Case, inputs: dict) -> Callable[[], object]:
    """One timed call. fwd+bwd clears ``student.grad`` first, so every call allocates it."""
    import cex_kernels
    s, t, p = inputs["student"], inputs["teacher"], inputs["projection"]
    if impl == "eager":
        loss_fn = eager_projected_mse
    elif impl == "torch.compile":
        loss_fn = compiled(eager_projected_mse)
    else:
        def loss_fn(s, t, p):
            return cex_kernels.projected_mse(s, t, p, backend=impl)
    if case.mode == "fwd":
        return lambda: loss_fn(s, t, p)

    def fwd_bwd():
        s.grad = None
        loss_fn(s, t, p).backward()
    return fwd_bwd


def _projected_mse_flops(case: Case) -> int:
    # One product pass 2*N*d_t*d_s in both modes, for every implementation: ours writes the
    # student's gradient in the forward pass, and eager's backward adds no GEMM when only
    # the student needs a gradient. The O(N*d_s) elementwise work is not counted.
    z = case.sizes
    return 2 * z["N"] * z["d_t"] * z["d_s"]


def _projected_mse_min_bytes(case: Case) -> int:
    # Read S, T, P once; fwd+bwd also writes the student's gradient (N x d_s).
    z, item = case.sizes, torch.empty((), dtype=case.dtype).element_size()
    elems = z["N"] * z["d_s"] + z["N"] * z["d_t"] + z["d_t"] * z["d_s"]
    if case.mode == "fwd+bwd":
        elems += z["N"] * z["d_s"]
    return elems * item


PROJECTED_MSE = OpSpec(
    name="projected_mse",
    shapes={"cpu": [dict(N=8192, d_t=1024, d_s=256), dict(N=2048, d_t=512, d_s=128),
                    dict(N=4096, d_t=768, d_s=384)],
            "cuda": [dict(N=16384, d_t=4096, d_s=1024), dict(N=8192, d_t=1024, d_s=256),
                     dict(N=65536, d_t=2048, d_s=512)]},
    dtypes={"cpu": (torch.float32,), "cuda": (torch.bfloat16, torch.float32)},
    impls=("cpu", "triton", "cuda", "reference", "eager", "torch.compile"),
    skip_reason=_projected_mse_skip_reason, make_inputs=_projected_mse_inputs,
    make_step=_projected_mse_step, flops=_projected_mse_flops,
    min_bytes=_projected_mse_min_bytes)

OPS: Dict[str, OpSpec] = {PROJECTED_MSE.name: PROJECTED_MSE}


def default_repeats(device, *, quick: bool = False) -> Tuple[int, int]:
    """(warmup, repeats). Warm-up >= 1 always: torch.compile compiles in the first call."""
    if torch.device(device).type == "cuda":
        return (3, 10) if quick else (10, 50)
    return (1, 3) if quick else (3, 15)


# --------------------------------------------------------------------------- report

def measure_case(spec: OpSpec, impl: str, case: Case, device, *, warmup: int, repeats: int,
                 peaks: Optional[dict] = None) -> dict:
    """Time one (impl, case) cell and measure its peak extra memory; one report row."""
    device = torch.device(device)
    row = {"op": spec.name, "impl": impl, "device": str(device), "dtype": case.dtype_name,
           "shape": case.sizes, "mode": case.mode, "flops": spec.flops(case),
           "min_bytes": spec.min_bytes(case)}
    inputs = spec.make_inputs(case, device)
    step = spec.make_step(impl, case, inputs)
    row["time_s"] = t = time_fn(step, warmup=warmup, repeats=repeats, device=device)
    if "student" in inputs and inputs["student"].requires_grad:
        inputs["student"].grad = None  # the measured call creates it (counted)
    row["peak_extra_memory_bytes"] = peak_extra_memory(step, device)
    row.update(rates(row["flops"], row["min_bytes"], t["median"], peaks or {}, case.dtype_name))
    return row


def rates(flops: int, min_bytes: int, seconds: float, peaks: dict, dtype_name: str) -> dict:
    """Achieved FLOP/s and bytes/s, and their fractions of the measured peaks (roofline)."""
    out = {"flops_per_s": flops / seconds, "min_bytes_per_s": min_bytes / seconds}
    gemm = peaks.get(f"gemm_flops_per_s_{dtype_name}")
    bw = peaks.get("copy_bytes_per_s")
    if gemm:
        out["gemm_peak_fraction"] = out["flops_per_s"] / gemm
    if bw:
        out["bandwidth_fraction"] = out["min_bytes_per_s"] / bw
    if gemm and bw:  # roofline: min(compute peak, intensity * bandwidth)
        bound = min(gemm, flops / max(min_bytes, 1) * bw)
        out["roofline_bound_flops_per_s"] = bound
        out["roofline_fraction"] = out["flops_per_s"] / bound
    return out


def run_report(op: str = "projected_mse", device=None, *, quick: bool = False,
               dtypes: Optional[Sequence[torch.dtype]] = None,
               impls: Optional[Sequence[str]] = None, warmup: Optional[int] = None,
               repeats: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Run an op's grid on ``device`` (default: cuda if available, else cpu).

    Returns ``{"environment", "peaks", "settings", "rows"}``; a row per (case, impl) that ran,
    with the raw times, plus ``skipped`` rows (impl, reason) and ``error`` rows (a failure
    is recorded, never fatal). ``speedup_vs_eager`` = eager median / this median.
    """
    spec = OPS[op]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = log or (lambda msg: None)
    w0, r0 = default_repeats(device, quick=quick)
    warmup = w0 if warmup is None else max(warmup, 1)
    repeats = repeats or r0
    cases = spec.cases(device, quick=quick, dtypes=dtypes)
    unknown = sorted(set(impls or ()) - set(spec.impls))
    if unknown:
        raise ValueError(f"{op}: unknown implementation(s) {unknown}; expected some of "
                         f"{list(spec.impls)}")
    impl_names = [i for i in spec.impls if impls is None or i in impls]
    log(f"measuring peak rates on {device_name(device)} ...")
    peaks = {"copy_bytes_per_s": measure_peak_copy_bandwidth(device)}
    for dt in sorted({c.dtype for c in cases}, key=str):
        peaks[f"gemm_flops_per_s_{str(dt).replace('torch.', '')}"] = \
            measure_peak_gemm_flops(device, dt)
    rows, skipped = [], []
    for impl in impl_names:
        reason = spec.skip_reason(impl, device)
        if reason:
            skipped.append({"impl": impl, "reason": reason})
    runnable = [i for i in impl_names if not any(s["impl"] == i for s in skipped)]
    for case in cases:
        for impl in runnable:
            log(f"{spec.name} {case} {impl}")
            try:
                rows.append(measure_case(spec, impl, case, device, warmup=warmup,
                                         repeats=repeats, peaks=peaks))
            except Exception as exc:  # record it and go on with the grid
                rows.append({"op": spec.name, "impl": impl, "device": str(device),
                             "dtype": case.dtype_name, "shape": case.sizes, "mode": case.mode,
                             "error": f"{type(exc).__name__}: {exc}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        eager = next((r for r in rows if r["impl"] == "eager" and "error" not in r
                      and (r["shape"], r["dtype"], r["mode"])
                      == (row["shape"], row["dtype"], row["mode"])), None)
        if eager and "error" not in row:
            row["speedup_vs_eager"] = eager["time_s"]["median"] / row["time_s"]["median"]
    return {"environment": environment(device), "peaks": peaks,
            "settings": {"op": op, "quick": quick, "warmup": warmup, "repeats": repeats},
            "skipped": skipped, "rows": rows}


def report_markdown(report: dict) -> str:
    """The report as a Markdown table (one per op), with the environment and peaks above."""
    env, peaks = report["environment"], report["peaks"]
    gpu = env["device"].startswith("cuda")
    unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    lines = [f"## {report['settings']['op']} on {env['device_name']}", "",
             f"torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
             f"{env['torch_num_threads']} threads, {env['date']}. "
             f"Warm-up {report['settings']['warmup']}, {report['settings']['repeats']} timed "
             "calls per cell; time = median (IQR).", "",
             "Measured peaks: " + ", ".join(
                 f"{k.replace('gemm_flops_per_s_', 'GEMM ')} {v / scale:.1f} {unit}"
                 for k, v in peaks.items() if k.startswith("gemm"))
             + f", copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write).", "",
             f"| shape N x d_t x d_s | dtype | mode | impl | time ms | {unit} | % peak GEMM "
             "| peak extra MiB | vs eager |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        shape = " x ".join(str(v) for v in r["shape"].values())
        head = f"| {shape} | {r['dtype']} | {r['mode']} | {r['impl']} |"
        if "error" in r:
            lines.append(head + f" error: {r['error'][:60]} | | | | |")
            continue
        t = r["time_s"]
        frac = r.get("gemm_peak_fraction")
        lines.append(
            head + f" {t['median'] * 1e3:.3f} ({t['iqr'] * 1e3:.3f}) | "
            f"{r['flops_per_s'] / scale:.1f} | {'' if frac is None else f'{100 * frac:.0f}%'} | "
            f"{r['peak_extra_memory_bytes'] / MiB:.2f} | "
            f"{r.get('speedup_vs_eager', float('nan')):.2f}x |")
    if report.get("skipped"):
        lines += [""] + [f"Skipped `{s['impl']}`: {s['reason']}." for s in report["skipped"]]
    lines += ["", "Peak extra memory: bytes allocated above the baseline at the peak of one "
              "call, outputs and the student's .grad included"
              + ("" if gpu else " (CPU: profiler allocation events on the calling thread; "
                 "worker-thread scratch and BLAS-internal buffers are not seen)") + "."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, json_path: Optional[str] = None,
                 md_path: Optional[str] = None) -> str:
    """Write the JSON (all raw figures) and/or Markdown; returns the Markdown."""
    import json
    md = report_markdown(report)
    for path, text in ((json_path, None), (md_path, md)):
        if not path:
            continue
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            if text is None:
                json.dump(report, f, indent=1, default=str)
                f.write("\n")
            else:
                f.write(text)
    return md


__all__ = ["Case", "OpSpec", "OPS", "MODES", "PROJECTED_MSE", "eager_projected_mse", "compiled",
           "default_repeats", "measure_case", "rates", "run_report", "report_markdown",
           "write_report"]
