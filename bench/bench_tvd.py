"""pytest-benchmark: tvd (ours, every backend with a TVD kernel that runs here) vs eager vs
torch.compile vs Liger-Kernel's ``LigerTVDLoss`` (CUDA, when installed; on softmaxes).

The grid is ``cex_kernels.benchmarking.OPS["tvd"]``, the same one ``bench/report.py`` and
``cex bench --op tvd`` run. Benchmarks report figures; they assert nothing about speed. The
op is memory-bound: ``extra_info`` has gb_per_s (both logits read once, the student's
gradient written in fwd+bwd, over the median) and bandwidth_fraction, besides flops
(nominal, 16 or 24 per logit), min_bytes and peak_extra_memory.

    python -m pytest bench/bench_tvd.py --benchmark-group-by=group --benchmark-sort=name
"""

OP = "tvd"  # bench/conftest.py parametrizes the test over this op's grid


def test_tvd(bench_cell, case, impl):
    bench_cell(case, impl)
