"""Ours vs torch.compile vs eager on the CPU, every cell in one process (issue 18).

The cells: issue 18's three (softmax_kl N=2048 V=32000 fp32 and bf16, linear_kl N=1024
H=256 V=32000 fp32), then every CPU grid shape of softmax_kl, tvd, linear_kl and
projected_mse in fp32 and bf16; forward + backward. Per cell, ours (the ``cpu`` backend),
``torch.compile`` and ``eager`` are timed interleaved, call by call
(``report.measure_cell``, the grid runner's own), with ``--threads`` intra-op threads.
Eager is left out of a cell where one call takes more than ``--eager-limit`` seconds (said
in the cell's ``skipped``). Written to ``<out-dir>/cpu-vs-compile-<date>.{json,md}``: per
cell each implementation's time (median, IQR, every call), torch.compile's time over ours
paired round by round (median, quartiles, min, max), the fractions of this machine's
measured limits (copy bandwidth; the fp32 exp rate for the logits losses; the GEMM peak
for linear_kl and projected_mse), peak extra memory, and the 1-minute load average before
and after each cell.

    python bench/cpu_vs_compile.py                 # many minutes: run on a quiet machine
    python bench/cpu_vs_compile.py --quick --out-dir /tmp/x   # tiny shapes, a smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Callable, List, Optional, Tuple

if __name__ == "__main__":  # run as a script: import the package of this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from cex_kernels.benchmarking import OPS
from cex_kernels.benchmarking import report as grid_report
from cex_kernels.benchmarking import measure
from cex_kernels.benchmarking.measure import MiB, environment
from cex_kernels.benchmarking.spec import Case, rates

OPS_RUN = ("softmax_kl", "tvd", "linear_kl", "projected_mse")
DTYPES = (torch.float32, torch.bfloat16)
IMPLS = ("cpu", "torch.compile", "eager")
ISSUE_CELLS = (("softmax_kl", dict(N=2048, V=32000), torch.float32),
               ("softmax_kl", dict(N=2048, V=32000), torch.bfloat16),
               ("linear_kl", dict(N=1024, H=256, V=32000), torch.float32))
# --quick: one tiny shape per op (the issue's cells shrink to it too)
QUICK_SHAPES = {"softmax_kl": dict(N=8, V=384), "tvd": dict(N=8, V=384),
                "linear_kl": dict(N=8, H=16, V=384), "projected_mse": dict(N=32, d_t=64, d_s=16)}
MODE = "fwd+bwd"
# The GEMM-bound ops' cells also time "GEMMs alone": only the products one fwd+bwd call of
# ours forms (same shapes, dtype, chunks, fresh outputs, the same GEMM route), no loss.
# torch.compile's time over it is the most any implementation with these FLOPs could be
# ahead of torch.compile here (its "ceiling").
GEMM_BOUND = ("linear_kl", "projected_mse")
GEMMS_ALONE = "GEMMs alone"


def gemms_alone_step(case: Case, inputs: dict) -> Callable[[], object]:
    """The products of one fwd+bwd call of ours in ``case``, nothing else."""
    from cex_kernels import _backends, _checks
    from cex_kernels.ops import _fused_linear
    if case.op == "projected_mse":
        s, t, p = inputs["student"], inputs["teacher"], inputs["projection"]

        @torch.no_grad()
        def product():  # ours: teacher @ projection formed in the (fresh) gradient's memory
            return _backends.matmul_into(torch.empty_like(s), t, p)
        return product
    h, w = inputs["hidden"], inputs["weight"]
    n, v = h.shape[0], w.shape[0]
    acc = _checks.accumulation_dtype(h.dtype)
    # the driver's own chunking, buffer and products, for this cell's call (cpu backend,
    # teacher logits, no labels); the logits stand in for their gradient
    call = types.SimpleNamespace(hidden=h, weight=w, backend="cpu", ce_weight=None,
                                 teacher_kind="logits")
    rows = _fused_linear.chunk_rows(call, None)

    @torch.no_grad()
    def step():
        buffer = _fused_linear.rows_buffer(rows, v, h)
        grad_hidden = torch.empty_like(h)
        grad_weight = None
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            logits = _fused_linear.linear_into(buffer[:r1 - r0], h[r0:r1], w)
            _backends.matmul_into(grad_hidden[r0:r1], logits, w)
            grad_weight = _fused_linear._accumulate_weight_grad(
                grad_weight, logits, h[r0:r1], w, acc, only_chunk=rows >= n)
    return step


def with_gemms_alone(spec):
    """``spec`` whose steps also build :data:`GEMMS_ALONE`."""
    def make_step(impl, case, inputs):
        if impl == GEMMS_ALONE:
            return gemms_alone_step(case, inputs)
        return spec.make_step(impl, case, inputs)
    return dataclasses.replace(spec, make_step=make_step)


def cells(quick: bool) -> List[Tuple[Case, bool]]:
    """(case, is one of issue 18's): the issue's cells first, then the grids' CPU cells;
    forward + backward, each once."""
    device = torch.device("cpu")
    out: List[Tuple[Case, bool]] = []
    for op, shape, dtype in ISSUE_CELLS:
        out += [(c, True) for c in OPS[op].cases(
            device, dtypes=[dtype], shapes=[QUICK_SHAPES[op] if quick else shape])]
    for op in OPS_RUN:
        out += [(c, False) for c in OPS[op].cases(
            device, dtypes=DTYPES, shapes=[QUICK_SHAPES[op]] if quick else None)]
    seen, unique = set(), []
    for case, issue in out:
        if case.mode == MODE and case not in seen:
            seen.add(case)
            unique.append((case, issue))
    return unique


def eager_too_slow(case: Case, limit_s: float) -> Optional[str]:
    """Why eager is left out of ``case`` (one untimed call over ``limit_s``), or None."""
    spec = OPS[case.op]
    inputs = spec.make_inputs(case, torch.device("cpu"))
    step = spec.make_step("eager", case, inputs)
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    if seconds > limit_s:
        return f"one eager call took {seconds:.1f} s (> {limit_s:g} s): not timed"
    return None


def run_cell(case: Case, issue_18: bool, peaks: dict, args) -> dict:
    """Time one cell's implementations interleaved; its rows, skips and load average."""
    spec, device = OPS[case.op], torch.device("cpu")
    impls, skipped = [], []
    for impl in args.impls:
        reason = spec.cell_skip_reason(impl, case, device)
        if reason is None and impl == "eager" and args.eager_limit > 0:
            reason = eager_too_slow(case, args.eager_limit)
        if reason:
            skipped.append({"impl": impl, "reason": reason})
        else:
            impls.append(impl)
    if case.op in GEMM_BOUND and "torch.compile" in impls:
        spec = with_gemms_alone(spec)
        impls.append(GEMMS_ALONE)
    load_before = os.getloadavg()[0]
    try:
        rows = grid_report.measure_cell(spec, impls, case, device, warmup=args.warmup,
                                        repeats=args.repeats, budget_s=args.budget, peaks=peaks)
    except Exception as exc:  # e.g. the inputs do not fit: recorded, the other cells go on
        rows = [{"impl": impl, "error": f"{type(exc).__name__}: {exc}"} for impl in impls]
    load_after = os.getloadavg()[0]
    grid_report.add_paired_ratios(rows)
    by_impl = {r["impl"]: r for r in rows if "error" not in r}
    if GEMMS_ALONE in by_impl and "torch.compile" in by_impl:
        by_impl[GEMMS_ALONE]["ceiling_vs_compile"] = measure.paired_ratio(
            by_impl["torch.compile"]["time_s"], by_impl[GEMMS_ALONE]["time_s"])
    return {"op": case.op, "case": str(case), "shape": case.sizes, "dtype": case.dtype_name,
            "mode": case.mode, "issue_18": issue_18, "load_1min": [load_before, load_after],
            "skipped": skipped, "rows": rows}


def run(args, save: Callable[[dict], None]) -> dict:
    """Measure the limits, then every cell; the report dict, passed to ``save`` after
    each cell (a run stopped midway keeps the cells done)."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    todo = cells(args.quick)
    # each op's rates against its own limits (the GEMM peak only for the GEMM-bound ops)
    op_peaks = {op: grid_report.measure_peaks(OPS[op], device,
                                              [c for c, _ in todo if c.op == op],
                                              small=args.quick) for op in OPS_RUN}
    peaks = {k: v for p in op_peaks.values() for k, v in p.items()}
    print("limits:", grid_report.peaks_text(peaks, gpu=False), flush=True)
    out = {"environment": environment(device), "peaks": peaks,
           "settings": {"quick": args.quick, "threads": args.threads, "impls": list(args.impls),
                        "warmup": args.warmup, "repeats": args.repeats,
                        "budget_s": args.budget, "eager_limit_s": args.eager_limit,
                        "timing": "interleaved, one process"},
           "cells": []}
    for case, issue_18 in todo:
        cell = run_cell(case, issue_18, op_peaks[case.op], args)
        out["cells"].append(cell)
        save(out)
        times = {r["impl"]: round(r["time_s"]["median"] * 1e3, 2) for r in cell["rows"]
                 if "time_s" in r}
        print(f"{case.op} {case}: ms {times}, load {cell['load_1min']}", flush=True)
    # The limits again, after the cells: on a shared VM one measurement can come out low
    # (a descheduled core), and a limit below what a cell achieved means nothing. Each
    # limit is the best of the two; every fraction is recomputed against it.
    measure.clear_peak_cache()
    again = {op: grid_report.measure_peaks(OPS[op], device,
                                           [c for c, _ in todo if c.op == op],
                                           small=args.quick) for op in OPS_RUN}
    out["peaks_measured"] = {"before": peaks,
                             "after": {k: v for p in again.values() for k, v in p.items()}}
    for op in OPS_RUN:
        op_peaks[op] = {k: max(v, again[op].get(k, v)) for k, v in op_peaks[op].items()}
    out["peaks"] = {k: v for p in op_peaks.values() for k, v in p.items()}
    for cell in out["cells"]:
        for row in cell["rows"]:
            if "time_s" in row:
                row.update(rates(row["flops"], row["min_bytes"], row["time_s"]["median"],
                                 op_peaks[cell["op"]], cell["dtype"], exps=row.get("exps")))
    print("limits (best of before and after):", grid_report.peaks_text(out["peaks"], gpu=False),
          flush=True)
    save(out)
    return out


def _cell_name(cell: dict) -> str:
    return f"{cell['op']} " + " ".join(f"{k}={v}" for k, v in cell["shape"].items())


def markdown(report: dict) -> str:
    """One table row per cell: each implementation's time, compile/ours, ours' fractions."""
    env, peaks, settings = report["environment"], report["peaks"], report["settings"]
    impls = settings["impls"]
    headers = (["cell", "dtype"] + [f"{'ours (`cpu`)' if i == 'cpu' else i} ms" for i in impls]
               + ["torch.compile / ours", f"ceiling: torch.compile / {GEMMS_ALONE}",
                  "ours % copy BW", "ours % exp limit", "ours % peak GEMM",
                  "peak extra MiB ours / compile", "load 1 min before, after"])
    lines = [f"# CPU: ours vs torch.compile vs eager, one process ({env['date']})", "",
             f"{env['device_name']}, {env['cpu_count']} CPUs, {settings['threads']} thread(s) "
             f"(`torch.set_num_threads`), torch {env['torch']}, cex_kernels "
             f"{env['cex_kernels']}, python {env['python']}"
             + (". **Quick smoke run: tiny shapes and small limit measurements, not figures "
                "to use.**" if settings["quick"] else "."), "",
             f"Forward + backward. `ours` = the `cpu` backend. Per cell the implementations "
             f"are timed interleaved, call by call, after {settings['warmup']} warm-up "
             f"round(s), at least {settings['repeats']} calls each and "
             f"{settings['budget_s']:g} s of timed calls; time = median (IQR) in ms. "
             "torch.compile / ours: the median of the round-by-round ratios of the two "
             "(> 1: ours is faster), interquartile range in brackets (min and max in the JSON).",
             "", "Measured limits (each the best of a measurement before the cells and one "
             "after): " + grid_report.peaks_text(peaks, gpu=False) + ".", "",
             "| " + " | ".join(headers) + " |", "|---|---|" + "---:|" * (len(headers) - 2)]
    notes = []
    for cell in report["cells"]:
        by_impl = {r["impl"]: r for r in cell["rows"]}
        ours, compiled = by_impl.get("cpu", {}), by_impl.get("torch.compile", {})
        cells = [_cell_name(cell) + (" (issue 18)" if cell["issue_18"] else ""), cell["dtype"]]
        for impl in impls:
            row = by_impl.get(impl)
            cells.append("" if row is None else f"error: {row['error'][:40]}" if "error" in row
                         else grid_report.time_text(row["time_s"]))
        memory = [f"{r['peak_extra_memory_bytes'] / MiB:.1f}" if "peak_extra_memory_bytes" in r
                  else "" for r in (ours, compiled)]
        alone = by_impl.get(GEMMS_ALONE, {})
        ceiling = grid_report.paired_text(alone.get("ceiling_vs_compile"))
        if "time_s" in alone:
            ceiling += f" ({GEMMS_ALONE}: {alone['time_s']['median'] * 1e3:.3g} ms)"
        cells += [grid_report.paired_text(ours.get("vs_compile")), ceiling,
                  grid_report.pct(ours.get("bandwidth_fraction")),
                  grid_report.pct(ours.get("exp_fraction")),
                  grid_report.pct(ours.get("gemm_peak_fraction")), " / ".join(memory),
                  ", ".join(f"{x:.2f}" for x in cell["load_1min"])]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {_cell_name(cell)} {cell['dtype']}: `{s['impl']}` skipped, {s['reason']}."
                  for s in cell["skipped"]]
    lines += [""] + notes + ([""] if notes else []) + [
        "% copy BW: the op's minimal bytes (inputs read once, gradients written once) per "
        "second over the measured copy bandwidth (read + write). % exp limit (softmax_kl, "
        "tvd): the exponentials one call needs (2 per logit) per second over the measured "
        "fp32 exp rate (the C++ kernels' own Sleef routine on an L1-resident row, every "
        "thread at once: `_C.exp_rate_cpu`). % peak "
        "GEMM (linear_kl, projected_mse): FLOP/s over the fastest square GEMM of the same "
        "dtype here (`torch.mm` or, for fp32, oneDNN's matmul, the ops' own route). "
        f"{GEMMS_ALONE} (linear_kl, projected_mse): only the products one fwd+bwd call of "
        "ours forms (same shapes, dtype, chunks, fresh outputs, the same GEMM route: oneDNN "
        "for fp32 and bf16 alike), no loss; timed interleaved with the others. torch.compile "
        "over it is the most that any implementation doing these GEMMs here could be ahead "
        "of torch.compile. "
        "Peak extra memory: bytes allocated above the inputs at the peak of one call "
        "(calling thread's allocator events). The JSON has every call's time and every "
        "implementation's fractions."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes, 1 warm-up round, 2 calls each: a smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impls", default=",".join(IMPLS),
                    help="comma-separated, from " + ",".join(IMPLS))
    ap.add_argument("--warmup", type=int, default=None, help="default 1")
    ap.add_argument("--repeats", type=int, default=None,
                    help="least timed calls per implementation (default 5, quick 2)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed calls per cell (default 10, quick 0)")
    ap.add_argument("--eager-limit", type=float, default=2.0,
                    help="leave eager out of a cell where one call takes longer (0: never)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    args.impls = [i for i in args.impls.split(",") if i]
    if not args.impls or set(args.impls) - set(IMPLS):
        ap.error(f"--impls: expected some of {','.join(IMPLS)}, got {args.impls}")
    args.warmup = max(1, args.warmup or 1)  # torch.compile compiles in the first call
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.budget = (0.0 if args.quick else 10.0) if args.budget is None else args.budget
    stem = f"cpu-vs-compile-{datetime.date.today().isoformat()}" + ("-quick" if args.quick else "")
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, stem)

    def save(report: dict) -> None:
        with open(base + ".json", "w") as f:
            json.dump(report, f, indent=1, default=str)
            f.write("\n")
        with open(base + ".md", "w") as f:
            f.write(markdown(report))
    report = run(args, save)
    print(f"wrote {base}.json and {base}.md", flush=True)
    return report


if __name__ == "__main__":
    main()
