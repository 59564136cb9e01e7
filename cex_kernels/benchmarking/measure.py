"""Measurement helpers shared by ``bench/`` and the ``cex bench`` CLI (grids: ``benchmarking.grids``).

- generic measurement: :func:`time_fn` (median/min/max/IQR of repeated calls),
  :func:`time_interleaved` (several implementations of one cell, call by call, under a
  time budget; :func:`is_noisy` flags a wide spread, :func:`paired_ratio` the round-by-round
  speedup), :func:`peak_extra_memory` (bytes allocated above the baseline at the peak of
  one call),
  the device's measured peak rates (:func:`measure_peak_gemm_flops`,
  :func:`measure_peak_copy_bandwidth`, :func:`measure_peak_exp_rate`) for roofline
  fractions, :func:`device_name` and
  :func:`environment`;
- the per-op grids live in :mod:`cex_kernels.benchmarking.grids`, the report runner in
  :mod:`cex_kernels.benchmarking.report`.

``bench/`` is not a package (it is not installed); everything the installed ``cex`` command
needs lives in this subpackage.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import re
import sys
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


def _percentile(sorted_ts: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, linear interpolation."""
    pos = q * (len(sorted_ts) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_ts[lo] + (sorted_ts[hi] - sorted_ts[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> dict:
    """Median, min, max, IQR (75th - 25th percentile, linear interpolation), mean, raw times."""
    ts = sorted(float(t) for t in times)
    if not ts:
        raise ValueError("summarize: no times")
    return {"median": _percentile(ts, 0.5), "min": ts[0], "max": ts[-1],
            "iqr": _percentile(ts, 0.75) - _percentile(ts, 0.25),
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


NOISY_SPREAD = 0.25  # a cell is "noisy" when its IQR exceeds this fraction of its median


def is_noisy(summary: dict, threshold: float = NOISY_SPREAD) -> bool:
    """The rule for flagging a timing: IQR > ``threshold`` x median (see :data:`NOISY_SPREAD`)."""
    return summary["iqr"] > threshold * summary["median"]


def time_interleaved(fns: Dict[str, Callable[[], object]], *, device, warmup: int = 1,
                     min_repeats: int = 5, budget_s: float = 0.5,
                     max_repeats: int = 1000) -> Dict[str, dict]:
    """Time several implementations of one cell call by call, alternating (A, B, C, A, B, ...).

    A load change on a shared machine then hits every implementation alike instead of
    whichever was being timed in a block. After ``warmup`` untimed rounds, rounds repeat
    until every function has ``min_repeats`` samples and the timed calls have taken
    ``budget_s`` seconds in all (or ``max_repeats`` rounds). Timer as :func:`time_fn`
    (CUDA events per call, or ``perf_counter`` on the CPU). Returns
    ``{name: summarize(...) + {"noisy": bool}}``; a function that raises is left out of
    later rounds and its entry is ``{"error": "Type: message"}``.
    """
    device = torch.device(device)
    live = dict(fns)
    errors: Dict[str, str] = {}
    times: Dict[str, List[float]] = {name: [] for name in fns}

    def call(name, fn):
        try:
            fn()
            return True
        except Exception as exc:  # recorded; the other implementations go on
            errors[name] = f"{type(exc).__name__}: {exc}"
            live.pop(name, None)
            return False

    for _ in range(warmup):
        for name, fn in list(live.items()):
            call(name, fn)
    synchronize(device)
    spent, rounds = 0.0, 0
    cuda = device.type == "cuda"
    while live and rounds < max_repeats and (rounds < min_repeats or spent < budget_s):
        for name, fn in list(live.items()):
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                ok = call(name, fn)
                end.record()
                if ok:
                    end.synchronize()  # keeps the rounds interleaved on the GPU too
                    times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                ok = call(name, fn)
                if ok:
                    times[name].append(time.perf_counter() - t0)
            if ok:
                spent += times[name][-1]
        rounds += 1
    out = {}
    for name in fns:
        if name in errors:
            out[name] = {"error": errors[name]}
        else:
            out[name] = summarize(times[name])
            out[name]["noisy"] = is_noisy(out[name])
    return out


def paired_ratio(baseline: dict, other: dict) -> Optional[dict]:
    """Round-by-round ratios ``baseline / other`` of two :func:`time_interleaved` timings
    (each pair ran back to back, under the same load): median, quartiles, min and max, or
    None when either has no times."""
    pairs = list(zip(baseline.get("times") or [], other.get("times") or []))
    ratios = sorted(a / b for a, b in pairs if b > 0)
    if not ratios:
        return None
    return {"median": _percentile(ratios, 0.5), "p25": _percentile(ratios, 0.25),
            "p75": _percentile(ratios, 0.75), "min": ratios[0], "max": ratios[-1],
            "rounds": len(ratios)}


def _legacy_profiler_memory_deltas(fn: Callable[[], object]) -> Optional[List[int]]:
    """Signed CPU allocator events (+ alloc, - free) of one call of ``fn``, in order, from
    the autograd profiler's legacy (non-Kineto) mode: quiet (no Kineto start/stop lines on
    stderr) and cheap. None when this torch has no legacy profiler."""
    autograd = torch._C._autograd
    if not hasattr(autograd, "_enable_profiler_legacy"):
        return None
    from torch._C._profiler import _ExperimentalConfig
    from torch.autograd import ProfilerConfig, ProfilerState
    # (state, report_input_shapes, profile_memory, with_stack, with_flops, with_modules)
    config = ProfilerConfig(ProfilerState.CPU, False, True, False, False, False,
                            _ExperimentalConfig())
    autograd._enable_profiler_legacy(config)
    try:
        out = fn()  # the output stays alive inside the profiled region
        del out
    finally:
        thread_events = autograd._disable_profiler_legacy()
    return [int(e.cpu_memory_usage()) for events in thread_events for e in events
            if e.kind() == "memory_alloc" and e.cpu_memory_usage()]


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Send file descriptor 2 to /dev/null (Kineto prints start/stop lines from C++)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _kineto_memory_deltas(fn: Callable[[], object]) -> List[int]:
    """The same events through ``torch.profiler`` (Kineto), its stderr lines silenced."""
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr_fd():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == cpu]
    return [int(e.nbytes()) for e in sorted(events, key=lambda e: e.start_ns())]


def peak_extra_memory(fn: Callable[[], object], device) -> int:
    """Bytes allocated above the baseline at the peak during one call of ``fn``.

    What counts: every tensor allocated by PyTorch's allocator during the call, while it is
    alive -- temporaries, autograd's saved tensors, the outputs ``fn`` returns and anything
    it leaves behind (e.g. a ``.grad`` it creates: clear gradients *before* calling this,
    or an existing ``.grad`` reused/freed shifts the figure). Memory alive before the call
    (inputs, an existing ``.grad``) is the baseline and does not count; freeing it during
    the call lowers the running total on CUDA, and on the CPU only when the allocator knew
    the block's size, so clear such memory before the call for comparable figures.

    CUDA: ``max_memory_allocated - memory_allocated`` before the call (peak stats reset).
    CPU: the CPU allocator reports every allocation and free to the autograd profiler when
    it records memory; run in its legacy (non-Kineto) mode, which prints nothing (Kineto's
    ``torch.profiler`` prints ``USDT ... profiler_start/stop`` lines per call; it is the
    fallback, with stderr silenced, for a torch without the legacy mode). The events, in
    order (positive = alloc, negative = free), give a running sum whose maximum is the
    result. This sees allocations made inside C++ kernels, on the calling thread. Not seen:
    allocations on intra-op worker threads (per-thread scratch in an ``at::parallel_for``
    region: the profiler's state is thread-local), and memory obtained outside PyTorch's
    allocator (BLAS/oneDNN internal packing buffers).
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
    deltas = _legacy_profiler_memory_deltas(fn)
    if deltas is None:
        deltas = _kineto_memory_deltas(fn)
    running = peak = 0
    for delta in deltas:
        running += delta
        peak = max(peak, running)
    return int(peak)


_PEAK_CACHE: Dict[tuple, float] = {}


def clear_peak_cache() -> None:
    """Forget the measured peaks, so that the next ``measure_peak_*`` call measures again."""
    _PEAK_CACHE.clear()


def measure_peak_gemm_flops(device, dtype: torch.dtype = torch.float32, n: Optional[int] = None,
                            repeats: int = 5) -> float:
    """FLOP/s of the fastest large square GEMM here (best of ``repeats``); measured once per
    run: ``torch.mm``, and on the CPU also the ops' own GEMM route
    (:func:`cex_kernels._backends.matmul_into`: oneDNN for fp32, faster than ``torch.mm``'s
    MKL here), so that a fraction of this peak is one of the best GEMM this machine runs.

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
        products = [lambda: torch.mm(a, b, out=out)]
        if device.type == "cpu":
            from cex_kernels import _backends
            products.append(lambda: _backends.matmul_into(out, a, b))
        best = min(time_fn(f, warmup=2, repeats=repeats, device=device)["min"] for f in products)
        _PEAK_CACHE[key] = 2.0 * n ** 3 / best
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


def measure_peak_exp_rate(device, dtype: torch.dtype = torch.float32, n: int = 128 * 1024,
                          calls: int = 200, repeats: int = 5) -> float:
    """Exponentials per second this machine sustains (best of ``repeats`` samples); measured
    once per run, with the process's intra-op threads (``torch.get_num_threads()``, part of
    the cache key). The inputs are in [-20, 0], the range of a row's logits minus its max.

    On the CPU with the compiled extension: the C++ row kernels' own exp routine (Sleef,
    at the widest SIMD width the CPU has) sweeping an L1-resident row on every thread at
    once (``_C.exp_rate_cpu``), the ceiling of those kernels' exponentials; ``torch.exp``
    reaches less through its dispatch. Elsewhere: ``torch.exp(x, out=y)`` over ``n``
    cache-resident elements, ``calls`` calls per sample.
    """
    device = torch.device(device)
    if n < 1 or calls < 1:
        raise ValueError(f"measure_peak_exp_rate: n and calls must be >= 1, got {n}, {calls}")
    key = ("exp", str(device), dtype, n, torch.get_num_threads())
    from cex_kernels import _backends
    if key not in _PEAK_CACHE and device.type == "cpu" and _backends._C is not None:
        per_thread = 4096  # 16 KiB of input and output: L1
        sweeps = max(1, n * calls // per_thread // max(torch.get_num_threads(), 1))
        _PEAK_CACHE[key] = max(_backends._C.exp_rate_cpu(per_thread, sweeps)
                               for _ in range(repeats))
    if key not in _PEAK_CACHE:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = (-20 * torch.rand(n, generator=gen)).to(device=device, dtype=dtype)
        y = torch.empty_like(x)

        def run():
            for _ in range(calls):
                torch.exp(x, out=y)
        t = time_fn(run, warmup=1, repeats=repeats, device=device)
        _PEAK_CACHE[key] = n * calls / t["min"]
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
