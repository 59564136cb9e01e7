"""PNG plots of a benchmark report (``cex bench --plot DIR``): time and peak extra memory
against problem size, one line per implementation, one figure per op/dtype/mode(/variant).

The size on the x axis is the product of the case's named sizes (N·V for ``softmax_kl``,
N·H·V for ``linear_kl``, N·d_t·d_s for ``projected_mse``). Needs matplotlib
(:func:`available` says whether it imports); the Agg backend is used, no display.
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from typing import List

from cex_kernels.benchmarking.measure import MiB


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_report(report: dict, out_dir: str) -> List[str]:
    """Write ``<op>-<dtype>-<mode>[-<variant>].png`` files to ``out_dir``; their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(out_dir, exist_ok=True)
    op = report["settings"]["op"]
    device = report["environment"]["device_name"]
    groups = defaultdict(lambda: defaultdict(list))  # (dtype, mode, variant) -> impl -> points
    for r in report["rows"]:
        if "error" in r:
            continue
        key = (r["dtype"], r["mode"], r.get("variant", ""))
        size = math.prod(r["shape"].values())
        groups[key][r["impl"]].append((size, r["time_s"]["median"] * 1e3,
                                       r["peak_extra_memory_bytes"] / MiB,
                                       " x ".join(str(v) for v in r["shape"].values())))
    paths = []
    for (dtype, mode, variant), impls in sorted(groups.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        size_label = "x".join(next(r for r in report["rows"] if "error" not in r)["shape"])
        for impl, points in impls.items():
            points.sort()
            xs = [p[0] for p in points]
            ax_t.plot(xs, [p[1] for p in points], marker="o", label=impl)
            ax_m.plot(xs, [max(p[2], 1e-3) for p in points], marker="o", label=impl)
        ticks = sorted({p[0]: p[3] for pts in impls.values() for p in pts}.items())
        for ax, ylabel in ((ax_t, "time per call, ms (median)"), (ax_m, "peak extra memory, MiB")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], rotation=20, fontsize=7)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel(f"size ({size_label})")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        title = f"{op} {dtype} {mode}" + (f" ({variant})" if variant else "")
        fig.suptitle(f"{title} on {device}", fontsize=10)
        fig.tight_layout()
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(
            x for x in (op, dtype, mode.replace("+", "_"), variant) if x)) + ".png"
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["available", "plot_report"]
