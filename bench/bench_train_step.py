"""pytest-benchmark: one curriculum-extraction training step per phase (projected-MSE phase,
final KL phase through the student's head), with our fused losses vs the eager losses vs
``torch.compile`` of the eager losses; the models themselves run eagerly in every row.

The grid is ``cex_kernels.benchmarking.TRAIN_STEP``, the same one ``cex bench --op
train_step`` runs. Benchmarks report figures; they assert nothing about speed.

    python -m pytest bench/bench_train_step.py --benchmark-group-by=group --benchmark-sort=name
"""

OP = "train_step"  # bench/conftest.py parametrizes the test over this op's grid


def test_train_step(bench_cell, case, impl):
    bench_cell(case, impl)
