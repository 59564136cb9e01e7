"""The ``cex`` command: benchmarks, backend listing and the Triton ahead-of-time check.

    cex bench [--quick] [--op projected_mse|softmax_kl|tvd|linear_kl|all] [--device cpu|cuda]
              [--json PATH] [--md PATH] [--plot DIR]
    cex backends
    cex aot [--arch 80 90] [--json PATH]      (= python -m cex_kernels.triton.aot)
    cex distill --config run.yaml [--resume|--overwrite] [--from-cache]
                                              (curriculum extraction and baselines)
    cex cache-teacher --config run.yaml [--dry-run] [--overwrite]   (offline distillation)
    cex demo [--quick|--full] [--out DIR] [--device cpu|cuda]   (sparse parity + a short benchmark)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

DTYPES = ("float32", "bfloat16", "float16")


def _op_path(path: Optional[str], op: str, several: bool) -> Optional[str]:
    """``{op}`` in a path is the op's name; with several ops and no ``{op}``, ``-<op>`` is
    inserted before the extension (one file per op)."""
    if not path:
        return path
    if "{op}" in path:
        return path.replace("{op}", op)
    if several:
        stem, ext = os.path.splitext(path)
        return f"{stem}-{op}{ext}"
    return path


def _bench(args) -> int:
    import torch

    from cex_kernels.benchmarking import plot as bench_plot
    from cex_kernels.benchmarking import report as bench_specs

    if args.device == "cuda" and not torch.cuda.is_available():
        print("cex bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    ops = sorted(bench_specs.OPS) if args.op == "all" else [args.op]
    several = len(ops) > 1
    if args.impl:
        unknown = sorted(set(args.impl) - {i for op in ops for i in bench_specs.OPS[op].impls})
        if unknown:
            print(f"cex bench: unknown implementation(s) {unknown} for {', '.join(ops)}",
                  file=sys.stderr)
            return 2
    if args.plot and not bench_plot.available():
        print("cex bench: --plot needs matplotlib, which does not import here "
              "(`pip install matplotlib`); no plots will be written", file=sys.stderr)
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.silent else None
    failed = []
    for op in ops:
        impls = args.impl
        if impls and several:  # with --op all, each op runs those of the impls it has
            impls = [i for i in impls if i in bench_specs.OPS[op].impls]
            if not impls:
                continue
        try:
            report = bench_specs.run_report(op, args.device, quick=args.quick, dtypes=dtypes,
                                            impls=impls, warmup=args.warmup,
                                            repeats=args.repeats, log=log)
        except ValueError as exc:
            print(f"cex bench: {exc}", file=sys.stderr)
            return 2
        print(bench_specs.write_report(report, _op_path(args.json, op, several),
                                       _op_path(args.md, op, several)))
        if args.plot and bench_plot.available():
            for path in bench_plot.plot_report(report, args.plot):
                print(f"cex bench: wrote {path}", file=sys.stderr)
        failed += [r for r in report["rows"] if "error" in r]
    for r in failed:
        print(f"cex bench: {r['op']} {r['impl']} {r['shape']} {r.get('variant', '')} "
              f"{r['dtype']} {r['mode']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _backends(args) -> int:
    import torch

    from cex_kernels import _backends as registry
    available = registry.backends()
    if args.json:
        print(json.dumps(available))
        return 0
    gpu = torch.cuda.is_available()
    for name, ok in available.items():
        entry = registry.get(name)
        note = entry.note if ok else registry.unavailable_reason(name)
        if ok and not gpu and not entry.accepts("cpu", entry.auto_devices):
            note += "; no GPU here"
        print(f"{name:<10} {'yes' if ok else 'no':<4} {note}")
    return 0


def _distill(args) -> int:
    import logging

    import torch.distributed as dist

    from cex_kernels.distill.checkpoint import CheckpointError
    from cex_kernels.distill.config import build_run, load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rank = 0
    try:
        # Everything a config can get wrong is raised here, before the first step.
        trainer = build_run(load_config(args.config), resume=args.resume,
                            overwrite=args.overwrite, from_cache=args.from_cache)
        result = trainer.fit()
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        # config, layer-map, shape, budget, out_dir and checkpoint errors
        print(f"cex distill: {exc}", file=sys.stderr)
        return 2
    finally:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():  # started by the trainer under torchrun
            dist.destroy_process_group()
    if rank != 0:
        return 0
    print(json.dumps({"global_step": result.global_step, "stopped_early": result.stopped_early,
                      "phase_flops": result.phase_flops, "student_dir": result.student_dir,
                      "final": result.records[-1] if result.records else None}))
    return 0


def _cache_teacher(args) -> int:
    import logging

    import torch.distributed as dist

    from cex_kernels.distill.config import build_cache_run, load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run = build_cache_run(load_config(args.config), overwrite=args.overwrite,
                              dry_run=args.dry_run, progress_bar=not args.no_progress)
        report = run()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"cex cache-teacher: {exc}", file=sys.stderr)
        return 2
    finally:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        est = report["estimate"]
        print(json.dumps({"path": report["path"], "rows": report["rows"],
                          "dry_run": args.dry_run, "shards_written": len(report["written"]),
                          "tokens": est.tokens, "bytes_per_token": est.bytes_per_token,
                          "total_bytes": est.total_bytes}))
    return 0


def _demo(args) -> int:
    import torch

    from cex_kernels.experiments.demo import run_demo

    if args.device == "cuda" and not torch.cuda.is_available():
        print("cex demo: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.silent else None
    result = run_demo(args.out, quick=args.quick, full=args.full, device=args.device, log=log)
    print(result["table"])
    print()
    print(result["legend"])
    secs = result["seconds"]
    print(f"cex demo: {secs['total']:.0f}s (sparse parity {secs['sparse_parity']:.0f}s, "
          f"benchmark {secs['bench']:.0f}s); wrote {result['json']}"
          + (f" and {result['plot']}" if result["plot"] else " (no plot: matplotlib missing)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cex_kernels.benchmarking.grids import OPS

    parser = argparse.ArgumentParser(
        prog="cex", description="cex-kernels: fused kernels for knowledge distillation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench = sub.add_parser(
        "bench", help="benchmark an op against eager PyTorch and torch.compile",
        description="Time every available implementation of an op over its shape grid "
                    "(forward, and forward + backward), with FLOP/s or GB/s and their "
                    "fraction of the measured peak GEMM rate or copy bandwidth, peak extra "
                    "memory and the ratios to eager; prints a Markdown table per op.")
    bench.add_argument("--op", default="projected_mse", choices=sorted(OPS) + ["all"],
                       help="the op to benchmark, or all of them (default: %(default)s)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="default: cuda if available, else cpu")
    bench.add_argument("--quick", action="store_true",
                       help="smallest shape, first dtype, few repeats (a smoke run)")
    bench.add_argument("--dtype", action="append", choices=DTYPES,
                       help="dtype(s) to run instead of the device's default (repeatable)")
    bench.add_argument("--impl", action="append",
                       help="only these implementations (repeatable), e.g. cpu, eager, "
                            "torch.compile, triton, cuda, reference, liger, cpu/64MiB")
    bench.add_argument("--warmup", type=int, help="untimed calls per cell (at least 1)")
    bench.add_argument("--repeats", type=int, help="timed calls per cell")
    bench.add_argument("--json", metavar="PATH",
                       help="write every raw figure + environment; with --op all, one file "
                            "per op ('{op}' in PATH is the op's name, else -<op> is added)")
    bench.add_argument("--md", metavar="PATH", help="write the Markdown table(s)")
    bench.add_argument("--plot", metavar="DIR",
                       help="write PNG plots (time and peak memory vs size, a line per "
                            "implementation) per op/dtype/mode; needs matplotlib")
    bench.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    bench.set_defaults(func=_bench)

    back = sub.add_parser("backends", help="list the backends this install can run",
                          description="Print cex_kernels.backends().")
    back.add_argument("--json", action="store_true", help="print one JSON object")
    back.set_defaults(func=_backends)

    from cex_kernels.distill.config import SCHEMA
    distill = sub.add_parser(
        "distill", help="run a distillation (curriculum extraction, one-shot or progressive) "
                        "described by a config file",
        description="Train a student from a YAML (needs PyYAML) or JSON config. Examples: "
                    "examples/sparse_parity.yaml, examples/hf_causal_lm.yaml. Exit status 2 "
                    "for a config error (reported before the first step).",
        epilog=SCHEMA, formatter_class=argparse.RawDescriptionHelpFormatter)
    distill.add_argument("--config", required=True, metavar="PATH", help="run.yaml or run.json")
    distill.add_argument("--resume", action="store_true",
                         help="continue the run in train.out_dir from its newest checkpoint "
                              "(= train.resume: auto)")
    distill.add_argument("--overwrite", action="store_true",
                         help="start over in a train.out_dir that holds a previous run "
                              "(= train.overwrite: true)")
    distill.add_argument("--from-cache", action="store_true",
                         help="train from the teacher cache in cache.dir (written by cex "
                              "cache-teacher): no teacher model is built or held in memory")
    distill.set_defaults(func=_distill)

    cache = sub.add_parser(
        "cache-teacher", help="run the teacher once over the dataset and store what "
                              "distillation needs (offline distillation)",
        description="Run the config's teacher over its training data (the trainer's "
                    "collator and batches) and write a teacher cache to cache.dir: per real "
                    "token the top-k (or sampled) log-probabilities and ids, and per mapped "
                    "layer the projected hidden state teacher_hidden @ P. Prints the size "
                    "estimate first. Rerun to resume after an interruption; under torchrun "
                    "the ranks split the shards. Then: cex distill --config ... --from-cache. "
                    "Format: cex_kernels/distill/cache.py and README.",
        epilog=SCHEMA, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache.add_argument("--config", required=True, metavar="PATH", help="run.yaml or run.json")
    cache.add_argument("--dry-run", action="store_true",
                       help="print the size estimate (per token and total) and write nothing")
    cache.add_argument("--overwrite", action="store_true",
                       help="replace a cache in cache.dir made with other settings")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    cache.set_defaults(func=_cache_teacher)

    demo = sub.add_parser(
        "demo", help="curriculum extraction vs one-shot on sparse parity, and a short "
                     "benchmark of the fused ops, on this device",
        description="Train a sparse-parity teacher, then students with labels alone, one-shot, "
                    "progressive distillation and curriculum extraction under one sample "
                    "budget (see cex_kernels/experiments/sparse_parity.py); benchmark the "
                    "fused ops against eager PyTorch (implementations timed interleaved, "
                    "median, spread and peak memory); print one summary table and write "
                    "demo.json and demo.png into --out. On 2 CPU cores: about a minute "
                    "(--quick: about 40 s, --full: several minutes); see README.")
    demo.add_argument("--out", default="cex-demo", metavar="DIR",
                      help="folder for demo.json and demo.png (default: %(default)s)")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="benchmark projected_mse only (the sparse-parity part is the same)")
    size.add_argument("--full", action="store_true",
                      help="benchmark the ops' quick grids with every implementation, "
                           "torch.compile included, and a longer time budget per cell")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="default: cuda if available, else cpu")
    demo.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    demo.set_defaults(func=_demo)

    aot = sub.add_parser("aot", help="compile the Triton kernels for sm_80/sm_90, no GPU needed",
                         description="Forwards its arguments to python -m cex_kernels.triton.aot "
                                     "(e.g. `cex aot --arch 90 --json report.json`).",
                         add_help=False)
    aot.add_argument("aot_args", nargs=argparse.REMAINDER)  # main() forwards them
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["aot"]:  # everything after `aot` (--help included) belongs to aot.main
        from cex_kernels import _backends
        if not _backends.backends()["triton"]:
            print(f"cex aot: the Triton kernels cannot be compiled here: "
                  f"{_backends.unavailable_reason('triton')}", file=sys.stderr)
            return 2
        from cex_kernels.triton import aot
        prog, sys.argv[0] = sys.argv[0], "cex aot"  # aot's argparse names itself from argv[0]
        try:
            return int(aot.main(argv[1:]) or 0)
        finally:
            sys.argv[0] = prog
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
