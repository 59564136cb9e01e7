"""``cex demo``: the package's main job in one command.

1. The default sparse-parity comparison (:mod:`cex_kernels.experiments.sparse_parity`):
   curriculum extraction vs one-shot / progressive distillation vs labels alone, same sample
   budget, test accuracy on fresh samples.
2. A short benchmark of the fused ops against eager PyTorch on the current device
   (:func:`cex_kernels.benchmarking.report.run_report`): each cell times its implementations
   interleaved, call by call, for a time budget, and reports the median, the spread
   (IQR), a ``noisy`` flag when the spread is large, and the peak extra memory.

It prints one summary table and writes, into a folder of its own (``--out``, default
``cex-demo/``), ``demo.json`` (every figure, raw times included) and ``demo.png`` (test
accuracy against steps, samples and FLOPs; each op's speedup and memory against eager).

Modes (times measured on this project's 2-core CPU, see README "The two commands"):

- default: ``projected_mse``, ``softmax_kl`` and ``linear_kl`` at :data:`DEMO_SHAPES`,
  ours against eager (no ``torch.compile``, whose compile time dominates a short run);
- ``--quick``: ``projected_mse`` alone;
- ``--full``: the benchmark's quick grid (:meth:`OpSpec.cases` with ``quick=True``) with
  every implementation, ``torch.compile`` included, and a longer time budget per cell
  (the default of earlier versions).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from cex_kernels.experiments.sparse_parity import (ParityConfig, run_comparison, summary_rows,
                                                   torch_threads)

BENCH_OPS = ("projected_mse", "softmax_kl", "linear_kl")
QUICK_OPS = ("projected_mse",)
# Ours (whichever backends the device runs) against eager PyTorch; --full adds the rest.
DEMO_IMPLS = ("cpu", "triton", "cuda", "eager")
# Smaller than the benchmark's quick grid on the CPU so that the default demo stays short;
# on CUDA the quick grid itself (None).
DEMO_SHAPES = {"cpu": {"projected_mse": dict(N=2048, d_t=512, d_s=128),
                       "softmax_kl": dict(N=512, V=32000),
                       "linear_kl": dict(N=256, H=256, V=32000)}}
BUDGET_S = {"default": 0.8, "full": 2.0}  # seconds of timed calls per benchmark cell
MIN_REPEATS = 5


def _mode(quick: bool, full: bool) -> str:
    if quick and full:
        raise ValueError("cex demo: --quick and --full exclude each other")
    return "quick" if quick else "full" if full else "default"


def _bench(ops: Sequence[str], device: str, impls: Optional[Sequence[str]], mode: str,
           log: Callable[[str], None]) -> Dict[str, Dict]:
    from cex_kernels.benchmarking import report as bench_specs
    reports = {}
    kind = torch.device(device).type
    for op in ops:
        names = [i for i in (impls or bench_specs.OPS[op].impls) if i in bench_specs.OPS[op].impls]
        shape = DEMO_SHAPES.get(kind, {}).get(op) if mode != "full" else None
        t0 = time.perf_counter()
        try:
            reports[op] = bench_specs.run_report(
                op, device, quick=True, impls=names, repeats=MIN_REPEATS,
                budget_s=BUDGET_S["full" if mode == "full" else "default"],
                shapes=[shape] if shape else None)
        except Exception as exc:  # a benchmark failure is reported, never fatal to the demo
            reports[op] = {"error": f"{type(exc).__name__}: {exc}", "rows": [], "skipped": []}
        log(f"bench {op}: {time.perf_counter() - t0:.1f}s")
    return reports


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3g} MiB"


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if x >= 0.1 or x == 0 else f"{x:.1g}x"


def _shape_text(shape) -> str:
    if isinstance(shape, dict):
        return " ".join(f"{k}={v}" for k, v in shape.items())
    return str(shape)


def bench_label(row: Dict) -> str:
    """``"projected_mse cex C++ fwd+bwd"``: one line, for the table and the plot."""
    from cex_kernels.benchmarking.spec import impl_label
    return f"{row['op']} {impl_label(row['impl'])} {row['mode']}"


def summary_table_rows(parity: Dict, reports: Dict[str, Dict]) -> List[Dict]:
    """One table: a row per distillation method, then a row per benchmark cell and
    implementation (eager is the baseline row of its cell)."""
    from cex_kernels.benchmarking.spec import impl_label
    rows = []
    for r in summary_rows(parity):
        rows.append({"part": "sparse parity", "what": r["method"],
                     "result": f"test acc {r['test_acc']:.3f}", "spread": "", "peak memory": "",
                     "detail": f"{r['samples']} samples, {r['flops']} FLOPs, {r['seconds']}s"})
    for op, rep in reports.items():
        if "error" in rep:
            rows.append({"part": f"bench {op}", "what": "-", "result": "error", "spread": "",
                         "peak memory": "", "detail": rep["error"][:80]})
        for row in rep["rows"]:
            what = f"{impl_label(row['impl'])} {row['mode']}"
            if "error" in row:
                rows.append({"part": f"bench {op}", "what": what, "result": "error",
                             "spread": "", "peak memory": "", "detail": row["error"][:80]})
                continue
            t = row["time_s"]
            speed, rounds = row.get("speedup_vs_eager"), row.get("speedup_vs_eager_rounds")
            if row["impl"] == "eager":
                result = f"{_ms(t['median'])} (baseline)"
            elif speed:
                result = f"{speed:.2f}x vs eager"
                if rounds:
                    result += f" ({rounds['p25']:.2f}-{rounds['p75']:.2f})"
            else:
                result = _ms(t["median"])
            spread = (f"IQR {100 * t['iqr'] / t['median']:.0f}%"
                      + (" NOISY" if t.get("noisy") else ""))
            mem = _mib(row["peak_extra_memory_bytes"])
            if row.get("memory_vs_eager") is not None and row["impl"] != "eager":
                mem += f" ({_ratio(row['memory_vs_eager'])} eager)"
            rows.append({"part": f"bench {op}", "what": what, "result": result, "spread": spread,
                         "peak memory": mem,
                         "detail": f"{row['dtype']} {_shape_text(row['shape'])}: "
                                   f"{_ms(t['median'])} median of {t['repeats']}"})
        for s in rep.get("skipped", []):
            rows.append({"part": f"bench {op}", "what": impl_label(s["impl"]), "result": "skipped",
                         "spread": "", "peak memory": "", "detail": s["reason"][:80]})
    return rows


def legend(reports: Dict[str, Dict], load: Optional[Sequence[float]]) -> str:
    """The table's footnotes: how times were taken, the noise rule, the machine's load."""
    from cex_kernels.benchmarking.measure import NOISY_SPREAD
    lines = ["Benchmark: each cell's implementations run interleaved, call by call (warm-up "
             f"first), at least {MIN_REPEATS} calls each and until the cell's time budget is "
             "spent; time = median. 'x vs eager' = median over rounds of eager's time / ours "
             "in the same round, its quartiles in brackets. spread = IQR / median; NOISY when it "
             f"exceeds {100 * NOISY_SPREAD:.0f}% (the machine was busy: rerun for figures). "
             "peak memory = bytes allocated above the inputs at the peak of one call, "
             "outputs and gradients included (CPU: the allocator's events on the calling "
             "thread; BLAS-internal buffers are not seen). 'cex C++' / 'cex CUDA' / "
             "'cex Triton' are this package's kernels."]
    for rep in reports.values():
        for text in rep.get("inversions", []):
            lines.append(f"Noise: {text} (a forward alone cannot be slower than forward + "
                         "backward).")
    cpus = os.cpu_count() or 1
    if load:
        lines.append(f"Load average when the demo started: {load[0]:.2f} (1 min) on "
                     f"{cpus} CPUs, {torch.get_num_threads()} torch threads in the benchmark.")
        if load[0] > 0.75 * cpus:
            lines.append("BUSY machine: other processes compete for the cores; a parallel "
                         "region waits for its slowest thread, so a descheduled worker can make "
                         "a call many times slower. Treat these times and ratios as "
                         "indicative only; rerun on a quiet machine for figures.")
    return "\n".join(lines)


def _bench_bars(reports: Dict[str, Dict]) -> List[Dict]:
    return [r for rep in reports.values() for r in rep.get("rows", [])
            if r.get("speedup_vs_eager") and r["impl"] != "eager"]


def plot_demo(path: str, parity: Dict, reports: Dict[str, Dict]) -> Optional[str]:
    """The PNG; returns its path, or None without matplotlib."""
    fig = demo_figure(parity, reports)
    if fig is None:
        return None
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def demo_figure(parity: Dict, reports: Dict[str, Dict]):
    """Top row: test accuracy against steps, samples and FLOPs, with chance (0.5), the
    teacher's accuracy and curriculum extraction's projected-MSE phase shaded (its accuracy
    stays flat there: the head is trained only in the KL phase). Bottom row, when there are
    benchmark cells: speedup over eager (median, quartile bars of the round-by-round
    ratios; hatched = noisy) and peak memory relative to eager, one line per cell, the
    figure growing with the number of cells so labels never overlap."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars = _bench_bars(reports)
    bench_h = 0.26 * len(bars) + 1.2 if bars else 0.0
    fig = plt.figure(figsize=(14, 4.2 + bench_h), layout="constrained")
    grid = fig.add_gridspec(2 if bars else 1, 6, height_ratios=[4.2, bench_h] if bars else [1])
    axes = [fig.add_subplot(grid[0, 2 * i:2 * i + 2]) for i in range(3)]
    labels = {"step": "optimizer steps", "samples": "training samples",
              "flops": "training FLOPs (matmuls)"}
    colors = {"labels": "tab:gray", "one_shot": "tab:orange", "progressive": "tab:green",
              "curriculum_extraction": "tab:blue"}
    ce = parity["students"].get("curriculum_extraction")
    c = parity["config"]
    for ax, x in zip(axes, ("step", "samples", "flops")):
        if ce and ce.get("phases") and len(ce["phases"]) > 1:
            steps = ce["phases"][0]["steps"]
            end = {"step": steps, "samples": steps * c["batch_size"],
                   "flops": (ce.get("phase_flops") or [0])[0]}[x]
            ax.axvspan(0, end, color=colors["curriculum_extraction"], alpha=0.12, lw=0,
                       label="CE projected-MSE phase")
        for name, r in parity["students"].items():
            ax.plot([p[x] for p in r["curve"]], [p["test_acc"] for p in r["curve"]],
                    label=name, color=colors.get(name))
        ax.axhline(0.5, color="gray", ls=":", lw=1, label="chance (0.5)")
        teacher_acc = parity.get("teacher", {}).get("test_acc")
        if teacher_acc is not None:
            ax.axhline(teacher_acc, color="black", ls="--", lw=0.8,
                       label=f"teacher ({teacher_acc:.3f})")
        ax.set_xlim(left=0)
        ax.set_xlabel(labels[x])
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.96))
    if bars:
        ys = list(range(len(bars)))[::-1]
        ax = fig.add_subplot(grid[1, :4])
        speed = [r["speedup_vs_eager"] for r in bars]
        lo = [max(0.0, s - r.get("speedup_vs_eager_rounds", {}).get("p25", s))
              for s, r in zip(speed, bars)]
        hi = [max(0.0, r.get("speedup_vs_eager_rounds", {}).get("p75", s) - s)
              for s, r in zip(speed, bars)]
        noisy = [bool(r["time_s"].get("noisy")) for r in bars]
        drawn = ax.barh(ys, speed, xerr=[lo, hi], color="tab:blue", ecolor="black",
                        error_kw={"lw": 0.8, "capsize": 2})
        for bar, n in zip(drawn, noisy):
            if n:
                bar.set_hatch("///")
                bar.set_alpha(0.6)
        ax.set_yticks(ys, [bench_label(r) for r in bars], fontsize=8)
        ax.set_ylim(-0.6, len(bars) - 0.4)
        ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.set_xlabel("speedup vs eager PyTorch (median of same-round ratios; bars: quartiles; "
                      "hatched: noisy)")
        ax.grid(axis="x", alpha=0.3)
        mem = fig.add_subplot(grid[1, 4:], sharey=ax)
        ratio = [r.get("memory_vs_eager") or 0.0 for r in bars]
        mem.barh(ys, ratio, color="tab:green")
        mem.axvline(1.0, color="gray", ls=":", lw=1)
        mem.tick_params(axis="y", labelleft=False)
        mem.set_xlabel("peak extra memory / eager's (lower is better)")
        mem.grid(axis="x", alpha=0.3)
    fig.suptitle(f"cex demo on {c['device']}: sparse parity d={c['d']}, k={c['k']}, "
                 f"student width {c['student_width']}, {c['samples']} samples per student",
                 fontsize=10)
    return fig


def run_demo(out_dir: str = "cex-demo", *, quick: bool = False, full: bool = False,
             device: Optional[str] = None, parity: Optional[ParityConfig] = None,
             bench_ops: Optional[Sequence[str]] = None,
             bench_impls: Optional[Sequence[str]] = None, threads: Optional[int] = 1,
             json_name: str = "demo.json", plot_name: str = "demo.png",
             log: Optional[Callable[[str], None]] = None) -> Dict:
    """Run the demo; returns the results dict (also written as JSON into ``out_dir``)."""
    import json

    from cex_kernels.benchmarking.measure import device_name
    mode = _mode(quick, full)
    log = log or (lambda msg: None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cfg = parity or ParityConfig(device=device)
    t0 = time.perf_counter()
    with torch_threads(threads if device == "cpu" else None):
        parity_result = run_comparison(cfg, log)
    t_parity = time.perf_counter() - t0
    ops = list(bench_ops if bench_ops is not None else (QUICK_OPS if quick else BENCH_OPS))
    impls = bench_impls if bench_impls is not None else (None if full else DEMO_IMPLS)
    reports = _bench(ops, device, impls, mode, log)
    rows = summary_table_rows(parity_result, reports)
    os.makedirs(out_dir, exist_ok=True)
    result = {"demo": "cex", "mode": mode, "quick": quick, "full": full, "device": device,
              "device_name": device_name(device), "cpu_count": os.cpu_count(),
              "load_average_at_start": list(load) if load else None,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "sparse_parity": parity_result, "bench": reports, "summary": rows,
              "seconds": {"sparse_parity": t_parity, "bench": time.perf_counter() - t0 - t_parity}}
    result["legend"] = legend(reports, load)
    result["plot"] = plot_demo(os.path.join(out_dir, plot_name), parity_result, reports)
    result["json"] = os.path.join(out_dir, json_name)
    result["seconds"]["total"] = time.perf_counter() - t0
    with open(result["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    result["table"] = format_rows(rows)
    return result


def format_rows(rows: List[Dict]) -> str:
    cols = list(rows[0]) if rows else []
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda vals: "| " + " | ".join(str(v).ljust(width[c]) for c, v in zip(cols, vals)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (width[c] + 2) for c in cols) + "|",
                      *(line([r[c] for c in cols]) for r in rows)])
