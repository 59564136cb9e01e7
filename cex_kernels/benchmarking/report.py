"""The report runner: measure an op's grid (every implementation, interleaved, per cell),
then write it as JSON and Markdown. Shared by ``bench/report.py``, ``cex bench`` and the demo.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

from cex_kernels.benchmarking.grids import OPS
from cex_kernels.benchmarking.measure import (NOISY_SPREAD, MiB, device_name, environment,
                                              measure_peak_copy_bandwidth,
                                              measure_peak_exp_rate, measure_peak_gemm_flops,
                                              paired_ratio, peak_extra_memory,
                                              time_interleaved)
from cex_kernels.benchmarking.spec import (OPTIONAL_METRICS, Case, OpSpec, clear_grads,
                                           default_repeats, impl_label, rates)

# Seconds of timed calls per cell (all implementations together), quick and full grids.
DEFAULT_BUDGET_S = {"quick": 0.5, "full": 2.0}


# --------------------------------------------------------------------------- report

def _timed_row(spec: OpSpec, impl: str, case: Case, device, t: dict, step, inputs: dict,
               peaks: Optional[dict]) -> dict:
    """The report row of a timed (impl, case): sizes, FLOPs, bytes, the timing ``t``, the
    peak extra memory of one more call of ``step`` and the rates against ``peaks``."""
    row = {"op": spec.name, "impl": impl, "device": str(device), "dtype": case.dtype_name,
           "shape": case.sizes, "mode": case.mode, "flops": spec.flops(case),
           "min_bytes": spec.min_bytes(case)}
    if case.variant:
        row["variant"] = case.variant
    row["time_s"] = t
    clear_grads(inputs)  # the measured call creates the gradients (counted)
    row["peak_extra_memory_bytes"] = peak_extra_memory(step, device)
    row.update(rates(row["flops"], row["min_bytes"], t["median"], peaks or {},
                     case.dtype_name, exps=spec.exps(case) if spec.exps else None))
    return row


def measure_peaks(spec: OpSpec, device, cases: Sequence[Case], *, small: bool = False) -> dict:
    """The copy bandwidth; the peak GEMM rate per dtype for ops with a GEMM roofline; the
    fp32 exp rate (``exp_per_s``) on the CPU for ops that count their exponentials.
    ``small``: a 32 MiB copy and 512-square GEMMs (a smoke run's figures, not limits)."""
    device = torch.device(device)
    peaks = {"copy_bytes_per_s": measure_peak_copy_bandwidth(
        device, nbytes=32 * MiB if small else None)}
    if spec.exps is not None and device.type == "cpu":
        # fp32: the precision every implementation evaluates the exponentials in
        peaks["exp_per_s"] = measure_peak_exp_rate(device, torch.float32)
    if spec.roofline == "gemm":
        for dt in sorted({c.dtype for c in cases}, key=str):
            peaks[f"gemm_flops_per_s_{str(dt).replace('torch.', '')}"] = \
                measure_peak_gemm_flops(device, dt, n=512 if small else None)
    return peaks


def _same_cell(a: dict, b: dict) -> bool:
    return ((a["shape"], a["dtype"], a["mode"], a.get("variant"))
            == (b["shape"], b["dtype"], b["mode"], b.get("variant")))


def _error_row(spec: OpSpec, impl: str, case: Case, device, error: str) -> dict:
    row = {"op": spec.name, "impl": impl, "device": str(device), "dtype": case.dtype_name,
           "shape": case.sizes, "mode": case.mode, "error": error}
    if case.variant:
        row["variant"] = case.variant
    return row


def measure_cell(spec: OpSpec, impls: Sequence[str], case: Case, device, *, warmup: int,
                 repeats: int, budget_s: float, peaks: Optional[dict] = None) -> list:
    """Time every implementation of one cell interleaved, call by call
    (:func:`~cex_kernels.benchmarking.measure.time_interleaved`: at least ``repeats`` calls each and
    ``budget_s`` seconds of timed calls in all), then measure each one's peak extra memory.
    The implementations share one set of inputs (every step clears the gradients it
    creates). One report row per implementation, an ``error`` row for one that fails."""
    device = torch.device(device)
    inputs = spec.make_inputs(case, device)
    steps, rows = {}, {}
    for impl in impls:
        try:
            steps[impl] = spec.make_step(impl, case, inputs)
        except Exception as exc:  # record it and go on with the others
            rows[impl] = _error_row(spec, impl, case, device, f"{type(exc).__name__}: {exc}")
    timings = time_interleaved(steps, device=device, warmup=warmup, min_repeats=repeats,
                               budget_s=budget_s)
    for impl, t in timings.items():
        if "error" in t:
            rows[impl] = _error_row(spec, impl, case, device, t["error"])
            continue
        rows[impl] = _timed_row(spec, impl, case, device, t, steps[impl], inputs, peaks)
    return [rows[i] for i in impls if i in rows]


def is_ours(impl: str) -> bool:
    """Whether ``impl`` is one of our kernels (a backend, optionally "/option", or "ours")."""
    from cex_kernels import _backends
    base = impl.partition("/")[0]
    return base == "ours" or base in _backends.names()


def add_paired_ratios(rows: Sequence[dict]) -> None:
    """Add to each row the figures against the other implementations of its cell:

    * ``speedup_vs_eager``: the median over rounds of eager's time / this row's time in the
      same round (the two ran back to back, under the same load), and
      ``speedup_vs_eager_rounds`` that median with the quartiles, min and max (the plain
      ratio of the medians when the rounds cannot be paired); ``memory_vs_eager`` = this
      row's peak extra memory / eager's;
    * for our rows (:func:`is_ours`), ``vs_compile``: the same paired ratio with
      torch.compile's time over ours (> 1: ours is faster), quartiles, min and max.
    """
    ok = [r for r in rows if "error" not in r]
    for row in ok:
        eager = next((r for r in ok if r["impl"] == "eager" and _same_cell(r, row)), None)
        if eager:
            paired = paired_ratio(eager["time_s"], row["time_s"])
            if paired is not None:  # same-round pairs: a load change hits both alike
                row["speedup_vs_eager"] = paired["median"]
                row["speedup_vs_eager_rounds"] = paired
            else:
                row["speedup_vs_eager"] = eager["time_s"]["median"] / row["time_s"]["median"]
            if eager["peak_extra_memory_bytes"] > 0:
                row["memory_vs_eager"] = (row["peak_extra_memory_bytes"]
                                          / eager["peak_extra_memory_bytes"])
        compiled = next((r for r in ok if r["impl"] == "torch.compile" and _same_cell(r, row)),
                        None)
        if compiled and is_ours(row["impl"]):
            paired = paired_ratio(compiled["time_s"], row["time_s"])
            if paired is not None:
                row["vs_compile"] = paired


def run_report(op: str = "projected_mse", device=None, *, quick: bool = False,
               dtypes: Optional[Sequence[torch.dtype]] = None,
               impls: Optional[Sequence[str]] = None, warmup: Optional[int] = None,
               repeats: Optional[int] = None, budget_s: Optional[float] = None,
               shapes: Optional[Sequence[dict]] = None,
               log: Optional[Callable[[str], None]] = None) -> dict:
    """Run an op's grid on ``device`` (default: cuda if available, else cpu).

    Each cell times its implementations interleaved (:func:`measure_cell`): ``repeats`` is
    the least number of timed calls per implementation, ``budget_s`` the seconds of timed
    calls per cell (default :data:`DEFAULT_BUDGET_S`, quick or full); ``shapes`` replaces
    the op's grid of shapes (e.g. the demo's smaller ones).

    Returns ``{"environment", "peaks", "settings", "skipped", "rows"}``; a row per (case,
    impl) that ran, with the raw times, ``skipped`` entries (impl, reason, and the cell when
    only some cells are skipped) and ``error`` rows (a failure is recorded, never fatal).
    Each row has its paired ratios to eager and (ours) to torch.compile
    (:func:`add_paired_ratios`); the peaks, the exp rate on the CPU for ops that count
    their exponentials (:func:`measure_peaks`).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(OPS)}")
    spec = OPS[op]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = log or (lambda msg: None)
    w0, r0 = default_repeats(device, quick=quick, spec=spec)
    warmup = w0 if warmup is None else max(warmup, 1)
    repeats = repeats or r0
    budget_s = DEFAULT_BUDGET_S["quick" if quick else "full"] if budget_s is None else budget_s
    cases = spec.cases(device, quick=quick, dtypes=dtypes, shapes=shapes)
    unknown = sorted(set(impls or ()) - set(spec.impls))
    if unknown:
        raise ValueError(f"{op}: unknown implementation(s) {unknown}; expected some of "
                         f"{list(spec.impls)}")
    impl_names = [i for i in spec.impls if impls is None or i in impls]
    log(f"measuring peak rates on {device_name(device)} ...")
    peaks = measure_peaks(spec, device, cases)
    rows, skipped = [], []
    for impl in impl_names:
        reason = spec.skip_reason(impl, device)
        if reason:
            skipped.append({"impl": impl, "reason": reason})
    runnable = [i for i in impl_names if not any(s["impl"] == i for s in skipped)]
    for case in cases:
        cell_impls = []
        for impl in runnable:
            reason = spec.cell_skip_reason(impl, case, device)
            if reason:
                if not any(s["impl"] == impl and s["reason"] == reason for s in skipped):
                    skipped.append({"impl": impl, "reason": reason, "cells": []})
                next(s for s in skipped if s["impl"] == impl
                     and s["reason"] == reason)["cells"].append(str(case))
                continue
            cell_impls.append(impl)
        if not cell_impls:
            continue
        log(f"{spec.name} {case}: {', '.join(cell_impls)} (interleaved)")
        try:
            rows += measure_cell(spec, cell_impls, case, device, warmup=warmup,
                                 repeats=repeats, budget_s=budget_s, peaks=peaks)
        except Exception as exc:  # e.g. the inputs do not fit: record it, go on with the grid
            rows += [_error_row(spec, i, case, device, f"{type(exc).__name__}: {exc}")
                     for i in cell_impls]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_paired_ratios(rows)
    return {"environment": environment(device), "peaks": peaks,
            "settings": {"op": op, "quick": quick, "warmup": warmup, "repeats": repeats,
                         "budget_s": budget_s, "timing": "interleaved",
                         "noisy_spread": NOISY_SPREAD},
            "skipped": skipped, "rows": rows, "inversions": timing_inversions(rows),
            "flop_check": check_flops(spec, cases, device) if "eager" in spec.impls else []}


def timing_inversions(rows: Sequence[dict]) -> List[str]:
    """Cells whose forward alone measured slower than forward + backward of the same
    implementation and problem: a sign of noise (the backward cannot be free)."""
    out = []
    ok = [r for r in rows if "error" not in r and "time_s" in r]
    for fwd in (r for r in ok if r["mode"] == "fwd"):
        both = next((r for r in ok if r["mode"] == "fwd+bwd" and r["impl"] == fwd["impl"]
                     and (r["shape"], r["dtype"], r.get("variant"))
                     == (fwd["shape"], fwd["dtype"], fwd.get("variant"))), None)
        if both and fwd["time_s"]["median"] > both["time_s"]["median"]:
            out.append(f"{fwd['op']} {fwd['impl']} {fwd['dtype']} "
                       f"{'x'.join(str(v) for v in fwd['shape'].values())}: fwd "
                       f"{fwd['time_s']['median'] * 1e3:.3g} ms > fwd+bwd "
                       f"{both['time_s']['median'] * 1e3:.3g} ms")
    return out


def check_flops(spec: OpSpec, cases, device) -> list:
    """Cross-check the analytic FLOPs once per mode and input variant against
    ``FlopCounterMode`` on the eager implementation (smallest shape of the grid). FlopCounterMode counts matrix products
    only, so ops whose cost is elementwise (softmax_kl) are reported, not compared."""
    from torch.utils.flop_counter import FlopCounterMode
    checks = []
    for mode, variant in sorted({(c.mode, c.variant) for c in cases}):
        group = [c for c in cases if c.mode == mode and c.variant == variant]
        case = min(group, key=lambda c: math.prod(c.sizes.values()))
        if spec.cell_skip_reason("eager", case, device):
            continue
        inputs = spec.make_inputs(case, device)
        step = spec.make_step("eager", case, inputs)
        with FlopCounterMode(display=False) as counter:
            step()
        counted, analytic = counter.get_total_flops(), spec.flops(case)
        checks.append({"case": str(case), "analytic": analytic, "flop_counter": counted,
                       "matches": counted == analytic if counted else None})
    return checks


def pct(x: Optional[float]) -> str:
    """A fraction as a percentage for a table cell ("" for None)."""
    return "" if x is None else f"{100 * x:.0f}%"


def ratio_text(x: Optional[float]) -> str:
    """A ratio for a table cell, "1.23x" ("" for None or NaN)."""
    if x is None or math.isnan(x):
        return ""
    return f"{x:.2f}x" if x >= 0.1 or x == 0 else f"{x:.1g}x"


def paired_text(paired: Optional[dict]) -> str:
    """A :func:`~cex_kernels.benchmarking.measure.paired_ratio` for a table cell: the median
    with the interquartile range in brackets, "1.23x (1.20-1.31)" ("" for None)."""
    if not paired:
        return ""
    return (f"{ratio_text(paired['median'])} "
            f"({paired['p25']:.2f}-{paired['p75']:.2f})")


def time_text(t: dict) -> str:
    """A timing (seconds) for a table cell: median (IQR) in ms, "noisy" when flagged."""
    return (f"{t['median'] * 1e3:.3f} ({t['iqr'] * 1e3:.3f})"
            + (" noisy" if t.get("noisy") else ""))


def peaks_text(peaks: dict, gpu: bool) -> str:
    """The measured peaks, one phrase each: GEMM per dtype, copy bandwidth, exp rate."""
    unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    text = [f"{k.replace('gemm_flops_per_s_', 'GEMM ')} {v / scale:.1f} {unit}"
            for k, v in peaks.items() if k.startswith("gemm")]
    text.append(f"copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write)")
    if peaks.get("exp_per_s"):
        text.append(f"exp {peaks['exp_per_s'] / 1e9:.2f} G/s (fp32, the C++ kernels' exp "
                    "routine, L1-resident, these threads)")
    return ", ".join(text)


def _columns(gpu: bool) -> dict:
    """Markdown columns by metric name: (header, row -> cell text)."""
    unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    return {
        "flops": (unit, lambda r: f"{r['flops_per_s'] / scale:.1f}"),
        "gemm_fraction": ("% peak GEMM", lambda r: pct(r.get("gemm_peak_fraction"))),
        "bandwidth": ("GB/s", lambda r: f"{r['min_bytes_per_s'] / 1e9:.1f}"),
        "bandwidth_fraction": ("% copy BW", lambda r: pct(r.get("bandwidth_fraction"))),
        "exp_fraction": ("% exp limit", lambda r: pct(r.get("exp_fraction"))),
        "peak_memory": ("peak extra MiB", lambda r: f"{r['peak_extra_memory_bytes'] / MiB:.2f}"),
        "memory_vs_eager": ("mem vs eager", lambda r: ratio_text(r.get("memory_vs_eager"))),
        "speedup": ("vs eager", lambda r: ratio_text(r.get("speedup_vs_eager"))),
        "vs_compile": ("vs torch.compile", lambda r: paired_text(r.get("vs_compile"))),
    }



def report_markdown(report: dict) -> str:
    """The report as a Markdown table, with the environment and peaks above.

    Columns: the shape (named by the op's sizes), the input variant when the op has any,
    dtype, mode, impl, time, then the op's ``metrics`` (GEMM-bound ops: FLOP/s and % of the
    measured GEMM peak; memory-bound ops: GB/s, % of the measured copy bandwidth and, on
    the CPU, % of the measured exp rate; "vs torch.compile": torch.compile's time over
    ours, paired by round, median (IQR)). The columns of :data:`OPTIONAL_METRICS` appear
    only when some row has their figure.
    """
    env, peaks, settings = report["environment"], report["peaks"], report["settings"]
    spec = OPS.get(settings["op"])
    gpu = env["device"].startswith("cuda")
    columns = _columns(gpu)
    rows = report["rows"]
    metrics = spec.metrics if spec else ("flops", "gemm_fraction", "peak_memory", "speedup")
    metrics = [m for m in metrics if m not in OPTIONAL_METRICS
               or any(r.get(m) is not None for r in rows)]
    size_names = list(rows[0]["shape"]) if rows else []
    with_variant = any(r.get("variant") for r in rows)
    headers = ([f"shape {' x '.join(size_names)}"] + (["teacher"] if with_variant else [])
               + ["dtype", "mode", "impl", "time ms"] + [columns[m][0] for m in metrics])
    lines = [f"## {settings['op']} on {env['device_name']}", "",
             f"torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
             f"{env['torch_num_threads']} threads, {env['date']}. "
             f"Warm-up {settings['warmup']}; the implementations of a cell are timed "
             "interleaved, call by call, at least "
             f"{settings['repeats']} calls each and {settings.get('budget_s', 0):g} s of timed "
             "calls per cell; time = median (IQR), marked `noisy` when the IQR exceeds "
             f"{100 * settings.get('noisy_spread', NOISY_SPREAD):.0f}% of the median.", "",
             "Measured peaks: " + peaks_text(peaks, gpu) + ".", "",
             "| " + " | ".join(headers) + " |",
             "|" + "---|" * (len(headers) - len(metrics) - 1) + "---:|" * (len(metrics) + 1)]
    for r in rows:
        cells = [" x ".join(str(v) for v in r["shape"].values())]
        if with_variant:
            cells.append(r.get("variant", "").replace("teacher_", ""))
        cells += [r["dtype"], r["mode"], r["impl"]]
        if "error" in r:
            cells += [f"error: {r['error'][:60]}"] + [""] * len(metrics)
        else:
            cells.append(time_text(r["time_s"]))
            cells += [columns[m][1](r) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("skipped"):
        lines.append("")
    for text in report.get("inversions", []):
        lines.append(f"- Noise: {text} (a forward alone cannot be slower; rerun when quieter).")
    for s in report.get("skipped", []):
        where = f" ({len(s['cells'])} cells)" if s.get("cells") else ""
        lines.append(f"- Skipped `{s['impl']}`{where}: {s['reason']}.")
    if spec is not None and spec.notes:
        lines += ["", spec.notes]
    for check in report.get("flop_check", []):
        verdict = ("matches" if check["matches"] else "does NOT match" if check["matches"] is False
                   else "not comparable: FlopCounterMode counts matrix products only")
        lines.append(f"- FLOP cross-check, eager `{check['case']}`: analytic "
                     f"{check['analytic']:.3e}, FlopCounterMode {check['flop_counter']:.3e} "
                     f"({verdict}).")
    lines += ["", "Peak extra memory: bytes allocated above the baseline at the peak of one "
              "call, outputs and the inputs' .grad included"
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
