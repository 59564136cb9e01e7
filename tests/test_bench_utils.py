"""Checks of the measurement helpers on toy cases with known answers (CPU, seconds)."""
import torch

from cex_kernels import bench_specs, bench_utils


def _bytes(n):
    return torch.empty(n, dtype=torch.uint8)


def test_peak_extra_memory_counts_one_known_allocation():
    assert bench_utils.peak_extra_memory(lambda: _bytes(1 << 20), "cpu") == 1 << 20


def test_peak_extra_memory_is_the_running_maximum():
    def alloc_free_alloc():
        a, b = _bytes(4 << 20), _bytes(1 << 20)
        del a  # peak was 5 MiB; 1 MiB is alive now
        return b, _bytes(2 << 20)  # 3 MiB alive at the end
    assert bench_utils.peak_extra_memory(alloc_free_alloc, "cpu") == 5 << 20


def test_peak_extra_memory_sees_allocations_inside_kernels():
    x = torch.randn(256, 1024)
    # (x * 2) allocates 1 MiB inside the mul kernel; .sum() a 4-byte scalar.
    peak = bench_utils.peak_extra_memory(lambda: (x * 2).sum(), "cpu")
    assert 1 << 20 <= peak <= (1 << 20) + 64


def test_freeing_baseline_memory_never_raises_the_peak():
    # On the CPU the free of a block allocated before profiling started is seen only when the
    # allocator recorded its size, so the result is 0 (free seen) or 1 MiB (not seen).
    held = [_bytes(3 << 20)]
    peak = bench_utils.peak_extra_memory(lambda: (held.clear(), _bytes(1 << 20)), "cpu")
    assert peak in (0, 1 << 20)


def test_time_fn_summary():
    t = bench_utils.time_fn(lambda: None, warmup=1, repeats=5, device="cpu")
    assert t["repeats"] == 5 and len(t["times"]) == 5
    assert t["min"] <= t["median"] <= t["max"] and t["iqr"] >= 0


def test_grid_is_shared_and_quick_is_smallest():
    spec = bench_specs.PROJECTED_MSE
    full, quick = spec.cases("cpu"), spec.cases("cpu", quick=True)
    assert {c.sizes["N"] for c in quick} == {2048} and {c.mode for c in quick} == {"fwd", "fwd+bwd"}
    assert set(quick) <= set(full) and len(full) == 3 * len(bench_specs.MODES)
    assert spec.flops(full[0]) == 2 * 8192 * 1024 * 256
