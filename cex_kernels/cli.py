"""The ``cex`` command: benchmarks, backend listing and the Triton ahead-of-time check.

    cex bench [--quick] [--op projected_mse] [--device cpu|cuda] [--json PATH] [--md PATH]
    cex backends
    cex aot [--arch 80 90] [--json PATH]      (= python -m cex_kernels.triton.aot)
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

DTYPES = ("float32", "bfloat16", "float16")


def _bench(args) -> int:
    import torch

    from cex_kernels import bench_specs

    if args.device == "cuda" and not torch.cuda.is_available():
        print("cex bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.silent else None
    try:
        report = bench_specs.run_report(args.op, args.device, quick=args.quick, dtypes=dtypes,
                                        impls=args.impl, warmup=args.warmup,
                                        repeats=args.repeats, log=log)
    except ValueError as exc:
        print(f"cex bench: {exc}", file=sys.stderr)
        return 2
    print(bench_specs.write_report(report, args.json, args.md))
    failed = [r for r in report["rows"] if "error" in r]
    for r in failed:
        print(f"cex bench: {r['impl']} {r['shape']} {r['dtype']} {r['mode']} failed: "
              f"{r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _backends(args) -> int:
    from cex_kernels import backends
    available = backends()
    if args.json:
        print(json.dumps(available))
    else:
        for name, ok in available.items():
            print(f"{name:<10} {'yes' if ok else 'no'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cex_kernels.bench_specs import OPS

    parser = argparse.ArgumentParser(
        prog="cex", description="cex-kernels: fused kernels for knowledge distillation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench = sub.add_parser(
        "bench", help="benchmark an op against eager PyTorch and torch.compile",
        description="Time every available implementation of an op over its shape grid "
                    "(forward, and forward + backward), with FLOP/s, the fraction of the "
                    "measured peak GEMM rate, peak extra memory and the speedup over eager; "
                    "prints a Markdown table.")
    bench.add_argument("--op", default="projected_mse", choices=sorted(OPS),
                       help="the op to benchmark (default: %(default)s)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="default: cuda if available, else cpu")
    bench.add_argument("--quick", action="store_true",
                       help="smallest shape, first dtype, few repeats (a smoke run)")
    bench.add_argument("--dtype", action="append", choices=DTYPES,
                       help="dtype(s) to run instead of the device's default (repeatable)")
    bench.add_argument("--impl", action="append",
                       help="only these implementations (repeatable), e.g. cpu, eager, "
                            "torch.compile, triton, cuda, reference")
    bench.add_argument("--warmup", type=int, help="untimed calls per cell (at least 1)")
    bench.add_argument("--repeats", type=int, help="timed calls per cell")
    bench.add_argument("--json", metavar="PATH", help="write every raw figure + environment")
    bench.add_argument("--md", metavar="PATH", help="write the Markdown table")
    bench.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    bench.set_defaults(func=_bench)

    back = sub.add_parser("backends", help="list the backends this install can run",
                          description="Print cex_kernels.backends().")
    back.add_argument("--json", action="store_true", help="print one JSON object")
    back.set_defaults(func=_backends)

    aot = sub.add_parser("aot", help="compile the Triton kernels for sm_80/sm_90, no GPU needed",
                         description="Forwards its arguments to python -m cex_kernels.triton.aot "
                                     "(e.g. `cex aot --arch 90 --json report.json`).",
                         add_help=False)
    aot.add_argument("aot_args", nargs=argparse.REMAINDER)  # main() forwards them
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["aot"]:  # everything after `aot` (--help included) belongs to aot.main
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
