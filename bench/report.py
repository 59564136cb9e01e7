"""Benchmark report without pytest: JSON (every raw figure + environment) and a Markdown table.

    python bench/report.py [--quick] [--device cpu|cuda] [--json PATH] [--md PATH] ...

the same as ``cex bench`` (the options are the CLI's). Importable: :func:`run` returns the
report dict. The grid and the runner live in ``cex_kernels.benchmarking`` (one definition,
shared with ``bench/bench_projected_mse.py`` and the installed ``cex`` command).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

if __name__ == "__main__":  # run as a script: import the package of this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cex_kernels.benchmarking import report as bench_specs
from cex_kernels.benchmarking.report import report_markdown, run_report, write_report  # noqa: F401


def run(op: str = "projected_mse", device=None, *, quick: bool = False,
        json_path: Optional[str] = None, md_path: Optional[str] = None, **kwargs) -> dict:
    """Run ``op``'s grid, write the files asked for, and return the report dict."""
    report = bench_specs.run_report(op, device, quick=quick, **kwargs)
    write_report(report, json_path, md_path)
    return report


def main(argv=None) -> int:
    from cex_kernels import cli
    return cli.main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
