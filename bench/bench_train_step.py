"""pytest-benchmark: one curriculum-extraction training step per phase (projected-MSE phase,
final KL phase through the student's head), with our fused losses vs the eager losses vs
``torch.compile`` of the eager losses; the models themselves run eagerly in every row.

The grid is ``cex_kernels.bench_specs.TRAIN_STEP``, the same one ``cex bench --op
train_step`` runs. Benchmarks report figures; they assert nothing about speed.

    python -m pytest bench/bench_train_step.py --benchmark-group-by=group --benchmark-sort=name
"""
import pytest

from cex_kernels import bench_specs, bench_utils

SPEC = bench_specs.TRAIN_STEP
DEVICE = bench_utils.torch.device("cuda" if bench_utils.torch.cuda.is_available() else "cpu")
CASES = SPEC.cases(DEVICE)


@pytest.mark.parametrize("impl", SPEC.impls)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_train_step(bench_cell, case, impl):
    bench_cell(SPEC, case, impl)
