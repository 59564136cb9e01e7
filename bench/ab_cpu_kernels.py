"""Old build vs new build vs torch.compile vs eager on the CPU, for a kernel change (issue 18).

Two builds of the extension cannot be loaded in one process (both register the ``cex``
ops), so each build runs in its own subprocess, alternated (old, new, new, old, ...):
every child times ``ours`` and, in the new tree, ``torch.compile`` and ``eager`` too,
interleaved call by call (``measure.time_interleaved``), with ``torch.set_num_threads``
threads. A pair of children run back to back gives one new/old ratio of their medians; the
load average (1 min) is recorded around every child, since the machine is shared.

    python bench/ab_cpu_kernels.py --old /work/main --new . --pairs 3 --out bench/results/x.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

CELLS = {  # name: (op, shape, dtype)
    "softmax_kl N2048 V32000 fp32": ("softmax_kl", (("N", 2048), ("V", 32000)), "float32"),
    "softmax_kl N2048 V32000 bf16": ("softmax_kl", (("N", 2048), ("V", 32000)), "bfloat16"),
    "linear_kl N1024 H256 V32000 fp32": ("linear_kl", (("N", 1024), ("H", 256), ("V", 32000)),
                                         "float32"),
}


def child(cell: str, impls, threads: int, min_repeats: int, budget_s: float) -> dict:
    import torch
    torch.set_num_threads(threads)
    import cex_kernels
    from cex_kernels.benchmarking import measure
    from cex_kernels.benchmarking.grids import linear_kl, softmax_kl
    from cex_kernels.benchmarking.spec import Case
    op, shape, dtype = CELLS[cell]
    case = Case(op, shape, getattr(torch, dtype), "fwd+bwd")
    grid = softmax_kl if op == "softmax_kl" else linear_kl
    make_inputs = grid._softmax_kl_inputs if op == "softmax_kl" else grid._linear_kl_inputs
    make_step = grid._softmax_kl_step if op == "softmax_kl" else grid._linear_kl_step
    inputs = make_inputs(case, torch.device("cpu"))
    fns = {("ours" if impl == "cpu" else impl): make_step(impl, case, inputs) for impl in impls}
    load_before = os.getloadavg()[0]
    out = measure.time_interleaved(fns, device="cpu", warmup=1, min_repeats=min_repeats,
                                   budget_s=budget_s)
    return {"package": os.path.dirname(cex_kernels.__file__), "load_1min": [load_before,
            os.getloadavg()[0]], "timings": out,
            "ratios": {f"ours/{k}": measure.paired_ratio(out["ours"], out[k])
                       for k in out if k != "ours" and "times" in out[k]}}


def run_child(tree: str, cell: str, impls, args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", cell, "--impls", ",".join(impls),
           "--threads", str(args.threads), "--min-repeats", str(args.min_repeats),
           "--budget", str(args.budget)]
    res = subprocess.run(cmd, env=env, cwd="/tmp", capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--impls", default="cpu")
    ap.add_argument("--old")
    ap.add_argument("--new", default=".")
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.impls.split(","), args.threads,
                               args.min_repeats, args.budget)))
        return
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
                         "CPUs (shared with other jobs)",
              "threads": args.threads, "old": os.path.abspath(args.old),
              "new": os.path.abspath(args.new), "cells": {}}
    for cell in args.cells.split(","):
        runs = []
        for k in range(args.pairs):
            order = [("old", args.old), ("new", args.new)]
            if k % 2:
                order.reverse()
            pair = {}
            for name, tree in order:
                impls = ["cpu"] if name == "old" else ["cpu", "torch.compile", "eager"]
                pair[name] = run_child(tree, cell, impls, args)
                t = pair[name]["timings"]
                print(cell, name, {i: round(v["median"] * 1e3, 1) for i, v in t.items()},
                      "load", pair[name]["load_1min"], flush=True)
            pair["new/old"] = (pair["new"]["timings"]["ours"]["median"]
                               / pair["old"]["timings"]["ours"]["median"])
            runs.append(pair)
        ratios = [p["new/old"] for p in runs]
        vs_compile = [p["new"]["ratios"]["ours/torch.compile"]["median"] for p in runs]
        vs_eager = [p["new"]["ratios"]["ours/eager"]["median"] for p in runs]
        loads = [x for p in runs for n in ("old", "new") for x in p[n]["load_1min"]]
        report["cells"][cell] = {
            "summary": {
                "new/old time (median over pairs, min, max)":
                    [statistics.median(ratios), min(ratios), max(ratios)],
                "new ours/torch.compile time (median, min, max of per-run paired medians)":
                    [statistics.median(vs_compile), min(vs_compile), max(vs_compile)],
                "new ours/eager time": [statistics.median(vs_eager), min(vs_eager),
                                        max(vs_eager)],
                "ms median old/new/compile/eager": [
                    statistics.median(p[n]["timings"][i]["median"] * 1e3 for p in runs)
                    for n, i in (("old", "ours"), ("new", "ours"), ("new", "torch.compile"),
                                 ("new", "eager"))],
                "load_1min (min, max)": [min(loads), max(loads)]},
            "runs": runs}
        print(cell, json.dumps(report["cells"][cell]["summary"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
