"""Argument checks shared by the public ops: one place, before any kernel runs.

Every error names the offending shapes/dtypes/devices and what was expected. The checks
only look at metadata (never at values), so they trace under torch.compile for free.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"cex_kernels.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cex_kernels.{op}: {name} must be float32, float16, bfloat16 or "
                        f"float64, got {t.dtype}")


def check_same_dtype(op: str, **tensors: torch.Tensor) -> torch.dtype:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"cex_kernels.{op}: all inputs must share one dtype, got {listed} "
                        "(cast them first, e.g. projection.to(student.dtype))")
    return next(iter(dtypes.values()))


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"cex_kernels.{op}: all inputs must be on one device, got {listed}")
    return next(iter(devices.values()))


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"cex_kernels.{op}: {name} must be one of {tuple(choices)}, got {value!r}")


def as_rows(t: torch.Tensor, *, unit_inner_stride: bool) -> torch.Tensor:
    """View ``(..., d)`` as ``(rows, d)`` without copying when the layout allows it.

    With ``unit_inner_stride`` the result is guaranteed to have stride 1 along ``d`` (the
    compiled kernels index rows with one stride); a copy is made only when it does not.
    """
    rows = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if unit_inner_stride and rows.shape[-1] > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/fp16/bf16; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
