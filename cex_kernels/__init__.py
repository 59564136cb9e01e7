"""cex-kernels: fused kernels for knowledge distillation by curriculum extraction.

Public API:
    projected_mse(student, teacher, projection, *, reduction="mean", backend="auto")
    random_projection(d_in, d_out, *, seed, kind="gaussian", dtype, device)
    ProjectedMSELoss(d_teacher, d_student, *, seed=0, kind="gaussian", learnable=False)
    backends()  -> {"triton": bool, "cuda": bool, "cpu": bool, "reference": True}
"""
from cex_kernels._backends import backends
from cex_kernels.losses import ProjectedMSELoss
from cex_kernels.ops.projected_mse import projected_mse
from cex_kernels.projection import random_projection

__version__ = "0.1.0"
__all__ = ["projected_mse", "random_projection", "ProjectedMSELoss", "backends"]
