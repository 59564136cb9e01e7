"""pytest-benchmark: linear_kl (ours with each backend that runs here, default and 64 MiB row
chunks) vs eager (the whole logits materialized) vs torch.compile vs Liger-Kernel's
``LigerFusedLinearJSD`` (CUDA, when installed; teacher as hidden states + head only).

The grid (shapes, teacher variants, dtypes, modes, implementations) is
``cex_kernels.benchmarking.LINEAR_KL``, the same one ``bench/report.py`` and
``cex bench --op linear_kl`` run. Benchmarks report figures; they assert nothing about
speed. ``extra_info``: peak_extra_memory (bytes, one call: the op's point), flops (2 N H V
per output-layer product: fwd 1, fwd+bwd 3, +1 for a teacher head), gflops_per_s, the
fraction of the measured peak GEMM rate, min_bytes.

    python -m pytest bench/bench_linear_kl.py --benchmark-group-by=group --benchmark-sort=name
"""

OP = "linear_kl"  # bench/conftest.py parametrizes the test over this op's grid


def test_linear_kl(bench_cell, case, impl):
    bench_cell(case, impl)
