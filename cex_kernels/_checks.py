"""Argument checks shared by the public ops and loss modules: one place, before any kernel runs.

Every error names the offending argument, shapes, dtypes or devices and what was expected.
Tensor checks only look at metadata (never at values), so they trace under torch.compile
for free. Python-number options accept what ``numbers`` calls real or integral (so NumPy
scalars work) but never ``bool``, strings or tensors.
"""
from __future__ import annotations

import math
import numbers

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
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"cex_kernels.{op}: {name} must be one of {tuple(choices)}, got {value!r}")


def check_real(op: str, name: str, value, *, low=None, high=None, low_open=False,
               high_open=False) -> float:
    """A finite real number (Python or NumPy scalar) in the given range, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"cex_kernels.{op}: {name} must be a real number, got "
                        f"{type(value).__name__} {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"cex_kernels.{op}: {name} must be a finite number in {lo}, {hi}, "
                         f"got {value!r}")
    return value


def check_int(op: str, name: str, value, *, low=None, high=None) -> int:
    """An integer (Python or NumPy, not bool) in [low, high], as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"cex_kernels.{op}: {name} must be an int, got "
                        f"{type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        wanted = ("a positive int" if (low, high) == (1, None) else
                  f"an int in [{'-inf' if low is None else low}, {'inf' if high is None else high}]")
        raise ValueError(f"cex_kernels.{op}: {name} must be {wanted}, got {value}")
    return value


def check_bool(op: str, name: str, value) -> bool:
    if not isinstance(value, bool) and type(value).__name__ != "bool_":  # numpy.bool_
        raise TypeError(f"cex_kernels.{op}: {name} must be True or False, got "
                        f"{type(value).__name__} {value!r}")
    return bool(value)


def check_dtype(op: str, name: str, value) -> torch.dtype:
    if not isinstance(value, torch.dtype):
        raise TypeError(f"cex_kernels.{op}: {name} must be a torch.dtype (e.g. torch.float32), "
                        f"got {type(value).__name__} {value!r}")
    return value


def check_temperature(op: str, temperature, *, scale_by_t2: bool) -> float:
    """T > 0 and finite, with 1/T (and T² when the loss is scaled by it) finite in fp32: the
    kernels scale logits by 1/T and the loss by T² in fp32, where anything else overflows
    to inf and gives NaN (eager PyTorch fails the same way)."""
    t = check_real(op, "temperature", temperature, low=0.0, low_open=True)
    fp32_max = torch.finfo(torch.float32).max
    if 1.0 / t > fp32_max or (scale_by_t2 and t * t > fp32_max):
        raise ValueError(f"cex_kernels.{op}: temperature={t!r} is out of range: 1/T"
                         f"{' and T²' if scale_by_t2 else ''} must be finite in float32 "
                         f"(about {1 / fp32_max:.1e} < T < "
                         f"{math.sqrt(fp32_max) if scale_by_t2 else math.inf:.1e})")
    return t


def check_row_selectors(op: str, lead, mask, labels) -> None:
    """``mask``: bool ``lead``-shaped (True = keep); ``labels``: integer ``lead``-shaped."""
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                             or mask.shape != lead):
        got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
               else type(mask).__name__)
        raise ValueError(f"cex_kernels.{op}: mask must be a bool tensor of shape {tuple(lead)} "
                         f"(True = keep the row), got {got}")
    if labels is not None and (not isinstance(labels, torch.Tensor)
                               or labels.dtype.is_floating_point or labels.dtype.is_complex
                               or labels.dtype == torch.bool or labels.shape != lead):
        got = (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
               else type(labels).__name__)
        raise ValueError(f"cex_kernels.{op}: labels must be an integer tensor of shape "
                         f"{tuple(lead)}, got {got}")


def as_rows(t: torch.Tensor, *, unit_inner_stride: bool) -> torch.Tensor:
    """View ``(..., d)`` as ``(rows, d)`` without copying when the layout allows it.

    With ``unit_inner_stride`` the result is guaranteed to have stride 1 along ``d`` (the
    compiled kernels index rows with one stride); a copy is made only when it does not.
    Empty tensors (zero rows or d = 0) come back with plain row-major strides.
    """
    d = t.shape[-1]
    rows = t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), d)
    if unit_inner_stride and d > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.numel() == 0 and rows.stride() != (d, 1):
        # torch calls every empty tensor contiguous whatever its strides; the kernels check
        # strides, so give them the usual ones (an empty copy costs nothing).
        rows = rows.as_strided(rows.shape, (d, 1))
    return rows


def autocast_dtype(device: torch.device):
    """The dtype ``torch.autocast`` computes matmuls in on this device, or None when it is off
    (or the device type has no autocast, e.g. meta)."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
    except RuntimeError:  # "unknown device type for autocast"
        return None
    return torch.get_autocast_dtype(device.type)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/fp16/bf16; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
