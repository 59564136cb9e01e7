"""The benchmark framework behind ``bench/``, ``cex bench`` and the demo.

* :mod:`~cex_kernels.benchmarking.spec`: a grid cell (:class:`Case`), an op's benchmark
  description (:class:`OpSpec`), repeat counts, roofline rates, which implementations run
  on a device (our backends: from the backend registry);
* :mod:`~cex_kernels.benchmarking.measure`: timing, peak memory, peak GEMM rate and copy
  bandwidth, environment;
* :mod:`~cex_kernels.benchmarking.grids`: one grid per op, collected in :data:`OPS`;
* :mod:`~cex_kernels.benchmarking.report`: the runner (JSON + Markdown);
* :mod:`~cex_kernels.benchmarking.plot`: the PNGs.
"""
from cex_kernels.benchmarking.grids import OPS
from cex_kernels.benchmarking.grids.linear_kl import LINEAR_KL
from cex_kernels.benchmarking.grids.projected_mse import PROJECTED_MSE
from cex_kernels.benchmarking.grids.softmax_kl import SOFTMAX_KL
from cex_kernels.benchmarking.grids.train_step import TRAIN_STEP
from cex_kernels.benchmarking.report import (check_flops, report_markdown, run_report,
                                             write_report)
from cex_kernels.benchmarking.spec import METRICS, MODES, Case, OpSpec

__all__ = ["OPS", "Case", "OpSpec", "MODES", "METRICS", "PROJECTED_MSE", "SOFTMAX_KL",
           "LINEAR_KL", "TRAIN_STEP", "run_report", "report_markdown", "write_report",
           "check_flops"]
