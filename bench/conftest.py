"""pytest setup for the benchmarks: collect ``bench_*.py`` files, share the device and its
measured peak rates (once per session) between benchmark files, and run one grid cell
(:func:`bench_cell`) the same way for every op."""
import pytest
import torch

from cex_kernels import bench_specs, bench_utils

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collect_file(file_path, parent):
    # The repository's pytest settings collect test_*.py; benchmark files are bench_*.py.
    # A file named on the command line is collected by pytest itself: not twice.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def peaks(request):
    """Measured peak GEMM rate (per dtype, lazily) and copy bandwidth, for roofline fractions.

    Empty under --benchmark-disable (nothing is timed, so there is nothing to compare)."""
    if request.config.getoption("benchmark_disable", False):
        return {}

    class LazyPeaks(dict):
        def get(self, key, default=None):
            if key not in self:
                if key == "copy_bytes_per_s":
                    self[key] = bench_utils.measure_peak_copy_bandwidth(DEVICE)
                elif key.startswith("gemm_flops_per_s_"):
                    dtype = getattr(torch, key.rsplit("_", 1)[-1])
                    self[key] = bench_utils.measure_peak_gemm_flops(DEVICE, dtype)
            return super().get(key, default)

    return LazyPeaks()


@pytest.fixture
def bench_cell(benchmark, peaks):
    """``bench_cell(spec, case, impl)``: time one grid cell with pytest-benchmark.

    Skips (with the spec's reason) what cannot run here; ``extra_info``: impl, flops,
    min_bytes, peak_extra_memory (bytes, one call, see ``bench_utils.peak_extra_memory``)
    and, when timed, gflops_per_s, gb_per_s and the fractions of the measured peaks (GEMM
    for GEMM-bound ops, copy bandwidth for all)."""
    def run(spec, case, impl):
        reason = spec.cell_skip_reason(impl, case, DEVICE)
        if reason:
            pytest.skip(reason)
        inputs = spec.make_inputs(case, DEVICE)
        step = spec.make_step(impl, case, inputs)
        warmup, repeats = bench_specs.default_repeats(DEVICE, spec=spec)
        benchmark.group = f"{spec.name} {case}"
        benchmark.pedantic(bench_utils.synchronized(step, DEVICE), rounds=repeats,
                           warmup_rounds=warmup, iterations=1)

        info = {"impl": impl, "flops": spec.flops(case), "min_bytes": spec.min_bytes(case)}
        bench_specs.clear_grads(inputs)  # the measured call creates the gradients (counted)
        info["peak_extra_memory"] = bench_utils.peak_extra_memory(step, DEVICE)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and not benchmark.disabled:
            cell_peaks = {"copy_bytes_per_s": peaks.get("copy_bytes_per_s")}
            if spec.roofline == "gemm":
                key = f"gemm_flops_per_s_{case.dtype_name}"
                cell_peaks[key] = peaks.get(key)
            rates = bench_specs.rates(info["flops"], info["min_bytes"], stats.stats.median,
                                      cell_peaks, case.dtype_name)
            info["gflops_per_s"] = rates["flops_per_s"] / 1e9
            info["gb_per_s"] = rates["min_bytes_per_s"] / 1e9
            for key in ("gemm_peak_fraction", "roofline_fraction", "bandwidth_fraction"):
                if key in rates:
                    info[key] = rates[key]
        benchmark.extra_info.update(info)
    return run
