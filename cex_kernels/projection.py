"""Seeded random projections: the fixed maps ``P`` of curriculum extraction.

A projection is determined by ``(d_in, d_out, seed, kind)`` alone, so it never needs
storing: it is drawn on the CPU in float64 with its own ``torch.Generator`` and then cast
and moved, which gives the same matrix on every device and for every dtype.
"""
from __future__ import annotations

import math

import torch

from cex_kernels import _checks

PROJECTION_KINDS = ("gaussian", "rademacher", "orthogonal")


def check_seed(op: str, seed) -> int:
    """A seed for torch.Generator.manual_seed: an int in [0, 2**64)."""
    return _checks.check_int(op, "seed", seed, low=0, high=2 ** 64 - 1)


def random_projection(d_in: int, d_out: int, *, seed: int, kind: str = "gaussian",
                      dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A ``(d_in, d_out)`` random projection, the same for a given seed on every device.

    - ``gaussian``: i.i.d. N(0, 1/d_out) entries (the paper's default), so E[P Pᵀ] = I.
    - ``rademacher``: i.i.d. ±1/sqrt(d_out), same variance, cheaper to draw in hardware.
    - ``orthogonal``: orthonormal columns (d_in >= d_out) or rows (d_in < d_out) from the QR
      of a Gaussian matrix, scaled by sqrt(max(d_in / d_out, 1)) so that E[P Pᵀ] = I
      as for the Gaussian kind.
    """
    op = "random_projection"
    d_in = _checks.check_int(op, "d_in", d_in, low=1)
    d_out = _checks.check_int(op, "d_out", d_out, low=1)
    seed = check_seed(op, seed)
    _checks.check_choice(op, "kind", kind, PROJECTION_KINDS)
    _checks.check_dtype(op, "dtype", dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"cex_kernels.random_projection: dtype must be floating, got {dtype}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "gaussian":
        p = torch.randn(d_in, d_out, generator=gen, dtype=torch.float64) / math.sqrt(d_out)
    elif kind == "rademacher":
        signs = torch.randint(0, 2, (d_in, d_out), generator=gen, dtype=torch.int64)
        p = (signs.to(torch.float64) * 2 - 1) / math.sqrt(d_out)
    else:
        g = torch.randn(max(d_in, d_out), min(d_in, d_out), generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
        p = (q if d_in >= d_out else q.T) * math.sqrt(max(d_in / d_out, 1.0))
    return p.to(dtype=dtype, device=device).contiguous()
