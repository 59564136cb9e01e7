"""Benchmark grid of ``projected_mse``, in ``grids.OPS``."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from cex_kernels.benchmarking.spec import (Case, OpSpec, compiled, impl_skip_reason, itemsize,
                                           our_backends)


def eager_projected_mse(student, teacher, projection):
    """The eager baseline: materializes ``teacher @ projection``, then ``F.mse_loss``."""
    return F.mse_loss(student, teacher @ projection)


def _inputs(case: Case, device: torch.device) -> dict:
    from cex_kernels import random_projection
    n, d_t, d_s = (case.sizes[k] for k in ("N", "d_t", "d_s"))
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(n, d_s, generator=gen).to(device=device, dtype=case.dtype)
    teacher = torch.randn(n, d_t, generator=gen).to(device=device, dtype=case.dtype)
    projection = random_projection(d_t, d_s, seed=0, dtype=case.dtype, device=device)
    student.requires_grad_(case.mode == "fwd+bwd")  # the curriculum-extraction case
    return {"student": student, "teacher": teacher, "projection": projection}


def _step(impl: str, case: Case, inputs: dict) -> Callable[[], object]:
    """One timed call. fwd+bwd clears ``student.grad`` first, so every call allocates it."""
    import cex_kernels
    s, t, p = inputs["student"], inputs["teacher"], inputs["projection"]
    if impl == "eager":
        loss_fn = eager_projected_mse
    elif impl == "torch.compile":
        loss_fn = compiled(eager_projected_mse)
    else:
        def loss_fn(s, t, p):
            return cex_kernels.projected_mse(s, t, p, backend=impl)
    if case.mode == "fwd":
        return lambda: loss_fn(s, t, p)

    def fwd_bwd():
        s.grad = None
        loss_fn(s, t, p).backward()
    return fwd_bwd


def _flops(case: Case) -> int:
    # One product pass 2*N*d_t*d_s in both modes, for every implementation: ours writes the
    # student's gradient in the forward pass, and eager's backward adds no GEMM when only
    # the student needs a gradient. The O(N*d_s) elementwise work is not counted.
    z = case.sizes
    return 2 * z["N"] * z["d_t"] * z["d_s"]


def _min_bytes(case: Case) -> int:
    # Read S, T, P once; fwd+bwd also writes the student's gradient (N x d_s).
    z = case.sizes
    elems = z["N"] * z["d_s"] + z["N"] * z["d_t"] + z["d_t"] * z["d_s"]
    if case.mode == "fwd+bwd":
        elems += z["N"] * z["d_s"]
    return elems * itemsize(case.dtype)


PROJECTED_MSE = OpSpec(
    name="projected_mse",
    shapes={"cpu": [dict(N=8192, d_t=1024, d_s=256), dict(N=2048, d_t=512, d_s=128),
                    dict(N=4096, d_t=768, d_s=384)],
            "cuda": [dict(N=16384, d_t=4096, d_s=1024), dict(N=8192, d_t=1024, d_s=256),
                     dict(N=65536, d_t=2048, d_s=512)]},
    dtypes={"cpu": (torch.float32,), "cuda": (torch.bfloat16, torch.float32)},
    impls=(*our_backends("projected_mse"), "eager", "torch.compile"),
    skip_reason=impl_skip_reason, make_inputs=_inputs, make_step=_step, flops=_flops,
    min_bytes=_min_bytes,
    notes="FLOPs: one product pass, 2 N d_t d_s, in both modes (the elementwise work is not "
          "counted). Minimal bytes: read S, T, P once; fwd+bwd also writes the gradient.")

__all__ = ["PROJECTED_MSE", "eager_projected_mse"]
