"""The benchmark grids, one module per op; :data:`OPS` collects them by op name.

A new op's grid is one module here defining an :class:`~cex_kernels.benchmarking.spec.OpSpec`
(shapes, dtypes, implementations, inputs, one timed step, FLOPs and minimal bytes) and one
entry in :data:`OPS`; ``bench/``, ``cex bench`` and the demo then run it.
"""
from typing import Dict

from cex_kernels.benchmarking.grids.linear_kl import LINEAR_KL
from cex_kernels.benchmarking.grids.projected_mse import PROJECTED_MSE
from cex_kernels.benchmarking.grids.softmax_kl import SOFTMAX_KL, TVD
from cex_kernels.benchmarking.grids.train_step import TRAIN_STEP
from cex_kernels.benchmarking.spec import OpSpec

OPS: Dict[str, OpSpec] = {spec.name: spec for spec in (PROJECTED_MSE, SOFTMAX_KL, TVD,
                                                         LINEAR_KL, TRAIN_STEP)}
