"""``cex demo``: the package's main job in one command.

1. The default sparse-parity comparison (:mod:`cex_kernels.experiments.sparse_parity`):
   curriculum extraction vs one-shot / progressive distillation vs labels alone, same sample
   budget, test accuracy on fresh samples.
2. A short benchmark of the fused ops on the current device
   (:func:`cex_kernels.bench_specs.run_report` with ``quick=True``).

It prints one summary table and writes ``cex-demo.json`` (every figure) and ``cex-demo.png``
(test accuracy against steps, samples and FLOPs, and each op's speedup over eager PyTorch).
``--quick`` (about a minute on 2 CPU cores) benchmarks ``projected_mse`` alone, without
``torch.compile`` (whose compile time dominates a short run on a CPU).
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from cex_kernels.experiments.sparse_parity import (ParityConfig, run_comparison, summary_rows,
                                                   torch_threads)

BENCH_OPS = ("projected_mse", "softmax_kl", "linear_kl")
QUICK_OPS = ("projected_mse",)
QUICK_IMPLS = ("cpu", "triton", "cuda", "eager")


def _bench(ops: Sequence[str], device: str, impls: Optional[Sequence[str]],
           log: Callable[[str], None]) -> Dict[str, Dict]:
    from cex_kernels import bench_specs
    reports = {}
    for op in ops:
        names = [i for i in (impls or bench_specs.OPS[op].impls) if i in bench_specs.OPS[op].impls]
        t0 = time.perf_counter()
        try:
            reports[op] = bench_specs.run_report(op, device, quick=True, impls=names)
        except Exception as exc:  # a benchmark failure is reported, never fatal to the demo
            reports[op] = {"error": f"{type(exc).__name__}: {exc}", "rows": [], "skipped": []}
        log(f"bench {op}: {time.perf_counter() - t0:.1f}s")
    return reports


def summary_table_rows(parity: Dict, reports: Dict[str, Dict]) -> List[Dict]:
    """One table: a row per distillation method, then a row per benchmark cell."""
    rows = []
    for r in summary_rows(parity):
        rows.append({"part": "sparse parity", "what": r["method"],
                     "result": f"test acc {r['test_acc']:.3f}",
                     "detail": f"{r['samples']} samples, {r['flops']} FLOPs, {r['seconds']}s"})
    for op, rep in reports.items():
        if "error" in rep:
            rows.append({"part": f"bench {op}", "what": "-", "result": "error",
                         "detail": rep["error"][:80]})
        for row in rep["rows"]:
            if "error" in row:
                rows.append({"part": f"bench {op}", "what": f"{row['impl']} {row['mode']}",
                             "result": "error", "detail": row["error"][:80]})
                continue
            speed = row.get("speedup_vs_eager")
            shape = "x".join(str(v) for v in row["shape"].values()) \
                if isinstance(row["shape"], dict) else str(row["shape"])
            rows.append({"part": f"bench {op}", "what": f"{row['impl']} {row['mode']}",
                         "result": f"{speed:.2f}x vs eager" if speed else "-",
                         "detail": f"{row['dtype']} {shape}: "
                                   f"{row['time_s']['median'] * 1e3:.3g} ms median"})
        for s in rep.get("skipped", []):
            rows.append({"part": f"bench {op}", "what": s["impl"], "result": "skipped",
                         "detail": s["reason"][:80]})
    return rows


def format_rows(rows: List[Dict]) -> str:
    cols = list(rows[0]) if rows else []
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda vals: "| " + " | ".join(str(v).ljust(width[c]) for c, v in zip(cols, vals)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (width[c] + 2) for c in cols) + "|",
                      *(line([r[c] for c in cols]) for r in rows)])


def plot_demo(path: str, parity: Dict, reports: Dict[str, Dict]) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bench_rows = [(f"{op}\n{r['impl']} {r['mode']}", r["speedup_vs_eager"])
                  for op, rep in reports.items() for r in rep["rows"]
                  if r.get("speedup_vs_eager") and r["impl"] != "eager"]
    n = 3 + bool(bench_rows)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4))
    labels = {"step": "optimizer steps", "samples": "training samples",
              "flops": "training FLOPs (matmuls)"}
    for ax, x in zip(axes, ("step", "samples", "flops")):
        for name, r in parity["students"].items():
            ax.plot([p[x] for p in r["curve"]], [p["test_acc"] for p in r["curve"]], label=name)
        ax.axhline(0.5, color="gray", ls=":", lw=1)
        ax.set_xlabel(labels[x])
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if bench_rows:
        ax = axes[3]
        ax.barh(range(len(bench_rows)), [s for _, s in bench_rows])
        ax.set_yticks(range(len(bench_rows)), [lbl for lbl, _ in bench_rows], fontsize=7)
        ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.set_xlabel("speedup vs eager PyTorch (quick grid)")
    c = parity["config"]
    fig.suptitle(f"cex demo on {parity['config']['device']}: sparse parity d={c['d']}, k={c['k']}, "
                 f"student width {c['student_width']}, {c['samples']} samples per student",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out_dir: str = ".", *, quick: bool = False, device: Optional[str] = None,
             parity: Optional[ParityConfig] = None, bench_ops: Optional[Sequence[str]] = None,
             bench_impls: Optional[Sequence[str]] = None, threads: Optional[int] = 1,
             json_name: str = "cex-demo.json", plot_name: str = "cex-demo.png",
             log: Optional[Callable[[str], None]] = None) -> Dict:
    """Run the demo; returns the results dict (also written as JSON)."""
    import json
    log = log or (lambda msg: None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = parity or ParityConfig(device=device)
    t0 = time.perf_counter()
    with torch_threads(threads if device == "cpu" else None):
        parity_result = run_comparison(cfg, log)
    t_parity = time.perf_counter() - t0
    ops = list(bench_ops if bench_ops is not None else (QUICK_OPS if quick else BENCH_OPS))
    impls = bench_impls if bench_impls is not None else (QUICK_IMPLS if quick else None)
    reports = _bench(ops, device, impls, log)
    rows = summary_table_rows(parity_result, reports)
    os.makedirs(out_dir, exist_ok=True)
    result = {"demo": "cex", "quick": quick, "device": device,
              "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda")
              else (platform.processor() or platform.machine()),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "sparse_parity": parity_result, "bench": reports, "summary": rows,
              "seconds": {"sparse_parity": t_parity, "bench": time.perf_counter() - t0 - t_parity}}
    result["plot"] = plot_demo(os.path.join(out_dir, plot_name), parity_result, reports)
    result["json"] = os.path.join(out_dir, json_name)
    result["seconds"]["total"] = time.perf_counter() - t0
    with open(result["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    result["table"] = format_rows(rows)
    return result
