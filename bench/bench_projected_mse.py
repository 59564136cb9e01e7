"""pytest-benchmark: projected_mse (ours, every backend that runs here) vs eager vs torch.compile.

The grid (shapes, dtypes, modes, implementations) is ``cex_kernels.benchmarking.PROJECTED_MSE``,
the same one ``bench/report.py`` and ``cex bench`` run. Benchmarks report figures; they assert
nothing about speed. Each benchmark's ``extra_info``: flops (one product pass, 2*N*d_t*d_s),
gflops_per_s (from the median), min_bytes, peak_extra_memory (bytes, one call, see
``benchmarking.measure.peak_extra_memory``) and, when timed, the fraction of the measured peak GEMM
rate (the cell itself is run by ``bench/conftest.py``'s ``bench_cell``).

    python -m pytest bench/bench_projected_mse.py --benchmark-group-by=group --benchmark-sort=name
"""

OP = "projected_mse"  # bench/conftest.py parametrizes the test over this op's grid


def test_projected_mse(bench_cell, case, impl):
    bench_cell(case, impl)
