"""Measurement helpers shared by ``bench/`` and the ``cex bench`` CLI (grids: ``bench_specs``).

- generic measurement: :func:`time_fn` (median/min/max/IQR of repeated calls),
  :func:`peak_extra_memory` (bytes allocated above the baseline at the peak of one call),
  the device's measured peak rates (:func:`measure_peak_gemm_flops`,
  :func:`measure_peak_copy_bandwidth`) for roofline fractions, :func:`device_name` and
  :func:`environment`;
- per-op benchmark specs and the report runner live in :mod:`cex_kernels.bench_specs`.

``bench/`` is not a package (it is not installed); everything the installed ``cex`` command
needs lives in these two modules.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import re
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

MiB = 1024 * 1024


# --------------------------------------------------------------------------- measurement

def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable[[], object], device) -> Callable[[], object]:
    """``fn`` followed by a device synchronize: for wall-clock timers (pytest-benchmark)."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        out = fn()
        synchronize(device)
        return out
    return call


def summarize(times: Sequence[float]) -> dict:
    """Median, min, max, IQR (75th - 25th percentile, linear interpolation), mean, raw times."""
    ts = sorted(float(t) for t in times)
    if not ts:
        raise ValueError("summarize: no times")

    def pct(q):
        pos = q * (len(ts) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ts[lo] + (ts[hi] - ts[lo]) * (pos - lo)

    return {"median": pct(0.5), "min": ts[0], "max": ts[-1], "iqr": pct(0.75) - pct(0.25),
            "mean": sum(ts) / len(ts), "repeats": len(ts), "times": list(times)}


def time_fn(fn: Callable[[], object], *, warmup: int, repeats: int, device) -> dict:
    """Time ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; seconds.

    CUDA: a pair of ``torch.cuda.Event(enable_timing=True)`` around each call on the current
    stream, one ``synchronize`` after the last (so launches are not serialized by the
    timer), i.e. GPU time from the first kernel's start to the last one's end, including any
    gaps where the GPU waited for the host. CPU: ``time.perf_counter`` around each call.
    Returns :func:`summarize`'s dict (``median``, ``min``, ``max``, ``iqr``, ...).
    """
    device = torch.device(device)
    if repeats < 1:
        raise ValueError(f"time_fn: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return summarize(times)


def _cpu_memory_deltas(prof) -> List[int]:
    """Signed sizes of the CPU allocator's alloc (+) / free (-) events, in time order."""
    kineto = getattr(prof.profiler, "kineto_results", None)
    if kineto is not None:  # raw events: every allocation, also those made inside an op
        cpu = torch._C._autograd.DeviceType.CPU
        events = [e for e in kineto.events()
                  if e.name() == "[memory]" and e.device_type() == cpu]
        return [int(e.nbytes()) for e in sorted(events, key=lambda e: e.start_ns())]
    # Fallback (older torch): the folded event list; an op's own allocations are dated at
    # its start, which can only overstate the peak.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return [int(e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage]


def peak_extra_memory(fn: Callable[[], object], device) -> int:
    """Bytes allocated above the baseline at the peak during one call of ``fn``.

    What counts: every tensor allocated by PyTorch's allocator during the call, while it is
    alive -- temporaries, autograd's saved tensors, the outputs ``fn`` returns and anything
    it leaves behind (e.g. a ``.grad`` it creates: clear gradients *before* calling this,
    or an existing ``.grad`` reused/freed shifts the figure). Memory alive before the call
    (inputs, an existing ``.grad``) is the baseline and does not count; freeing it during
    the call lowers the running total on CUDA, and on the CPU only when the allocator knew
    the block's size (torch warns "Memory block of unknown size ..." otherwise), so clear
    such memory before the call for comparable figures.

    CUDA: ``max_memory_allocated - memory_allocated`` before the call (peak stats reset).
    CPU: ``torch.profiler`` with ``profile_memory=True``; the CPU allocator's events, in
    order (positive = alloc, negative = free), give a running sum whose maximum is the
    result. This sees allocations made inside C++ kernels, on the calling thread. Not seen:
    allocations on intra-op worker threads (e.g. per-thread scratch in an
    ``at::parallel_for`` region: the profiler's state is thread-local, and its
    all-threads mode records no memory events in torch 2.13), and memory obtained outside
    PyTorch's allocator (BLAS/oneDNN internal packing buffers).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()  # the output stays alive inside the profiled region
    del out
    running = peak = 0
    for delta in _cpu_memory_deltas(prof):
        running += delta
        peak = max(peak, running)
    return int(peak)


_PEAK_CACHE: Dict[tuple, float] = {}


def measure_peak_gemm_flops(device, dtype: torch.dtype = torch.float32, n: Optional[int] = None,
                            repeats: int = 5) -> float:
    """FLOP/s of a large square ``torch.mm`` (best of ``repeats``); measured once per run.

    n defaults to 8192 on CUDA and 2048 on the CPU. On CUDA fp32 follows the current TF32
    setting (``torch.backends.cuda.matmul.allow_tf32``), recorded by :func:`environment`.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    key = ("gemm", str(device), dtype, n)
    if key not in _PEAK_CACHE:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        t = time_fn(lambda: torch.mm(a, b, out=out), warmup=2, repeats=repeats, device=device)
        _PEAK_CACHE[key] = 2.0 * n ** 3 / t["min"]
    return _PEAK_CACHE[key]


def measure_peak_copy_bandwidth(device, nbytes: Optional[int] = None, repeats: int = 5) -> float:
    """Bytes/s of a large device-to-same-device copy, counting bytes read + written."""
    device = torch.device(device)
    nbytes = nbytes or (1024 if device.type == "cuda" else 256) * MiB
    key = ("copy", str(device), nbytes)
    if key not in _PEAK_CACHE:
        src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
        dst = torch.empty_like(src)
        t = time_fn(lambda: dst.copy_(src), warmup=2, repeats=repeats, device=device)
        _PEAK_CACHE[key] = 2.0 * src.numel() * 4 / t["min"]
    return _PEAK_CACHE[key]


def device_name(device) -> str:
    """GPU name from CUDA, or the CPU model from /proc/cpuinfo (``platform`` elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "cpu"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def short_device_name(device) -> str:
    """A file-name slug: "AMD EPYC (family 26, ...)" -> "amd-epyc", "NVIDIA H100 ..." -> ..."""
    name = device_name(device).split("(")[0]
    name = re.sub(r"\b(CPU|Processor|\d+-Core)\b|@.*|\(R\)|\(TM\)", "", name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def environment(device) -> dict:
    """Versions, date and device, stored with every report."""
    import cex_kernels
    device = torch.device(device)
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device),
        "python": platform.python_version(), "torch": torch.__version__,
        "cex_kernels": cex_kernels.__version__, "backends": cex_kernels.backends(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cuda_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        env["device_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env
