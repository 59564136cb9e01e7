"""pytest-benchmark: softmax_kl (ours, every backend that runs here) vs eager vs torch.compile
vs Liger-Kernel's ``LigerKLDIVLoss`` (CUDA, when installed).

The grid (shapes, dtypes, modes, implementations) is ``cex_kernels.benchmarking.SOFTMAX_KL``,
the same one ``bench/report.py`` and ``cex bench --op softmax_kl`` run. Benchmarks report
figures; they assert nothing about speed. The op is memory-bound: each benchmark's
``extra_info`` has gb_per_s (minimal bytes -- both logits read once, the student's gradient
written in fwd+bwd -- over the median) and bandwidth_fraction (of the measured copy
bandwidth), besides flops (nominal, 10 or 12 per logit), min_bytes and peak_extra_memory.

    python -m pytest bench/bench_softmax_kl.py --benchmark-group-by=group --benchmark-sort=name
"""

OP = "softmax_kl"  # bench/conftest.py parametrizes the test over this op's grid


def test_softmax_kl(bench_cell, case, impl):
    bench_cell(case, impl)
