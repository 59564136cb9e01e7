"""pytest setup for the benchmarks: collect ``bench_*.py`` files, share the device and its
measured peak rates (once per session) between benchmark files, parametrize each file's
test over its op's grid, and run one grid cell (:func:`bench_cell`) the same way for every
op.

A benchmark file names its op (``OP = "softmax_kl"``, a key of
``cex_kernels.benchmarking.OPS``) and defines ``test_<op>(bench_cell, case, impl)``; the
cases (this device's grid) and implementations come from the op's spec here.
"""
import pytest
import torch

from cex_kernels.benchmarking import OPS
from cex_kernels.benchmarking import measure
from cex_kernels.benchmarking import spec as spec_helpers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    op = getattr(metafunc.module, "OP", None)
    if op is not None and {"case", "impl"} <= set(metafunc.fixturenames):
        spec = OPS[op]
        metafunc.parametrize("impl", spec.impls)
        metafunc.parametrize("case", spec.cases(DEVICE), ids=str)


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
    """Measured peak GEMM rate (per dtype), copy bandwidth and exp rate, each measured when
    first asked for, for roofline fractions.

    Empty under --benchmark-disable (nothing is timed, so there is nothing to compare)."""
    if request.config.getoption("benchmark_disable", False):
        return {}

    class LazyPeaks(dict):
        def get(self, key, default=None):
            if key not in self:
                if key == "copy_bytes_per_s":
                    self[key] = measure.measure_peak_copy_bandwidth(DEVICE)
                elif key == "exp_per_s":
                    self[key] = measure.measure_peak_exp_rate(DEVICE)
                elif key.startswith("gemm_flops_per_s_"):
                    dtype = getattr(torch, key.rsplit("_", 1)[-1])
                    self[key] = measure.measure_peak_gemm_flops(DEVICE, dtype)
            return super().get(key, default)

    return LazyPeaks()


@pytest.fixture
def bench_cell(benchmark, peaks):
    """``bench_cell(case, impl)``: time one grid cell with pytest-benchmark.

    Skips (with the spec's reason) what cannot run here; ``extra_info``: impl, flops,
    min_bytes, peak_extra_memory (bytes, one call, see ``benchmarking.measure.peak_extra_memory``)
    and, when timed, gflops_per_s, gb_per_s and the fractions of the measured peaks (GEMM
    for GEMM-bound ops, copy bandwidth for all, the exp rate on the CPU for ops that count
    their exponentials)."""
    def run(case, impl):
        spec = OPS[case.op]
        reason = spec.cell_skip_reason(impl, case, DEVICE)
        if reason:
            pytest.skip(reason)
        inputs = spec.make_inputs(case, DEVICE)
        step = spec.make_step(impl, case, inputs)
        warmup, repeats = spec_helpers.default_repeats(DEVICE, spec=spec)
        benchmark.group = f"{spec.name} {case}"
        benchmark.pedantic(measure.synchronized(step, DEVICE), rounds=repeats,
                           warmup_rounds=warmup, iterations=1)

        info = {"impl": impl, "flops": spec.flops(case), "min_bytes": spec.min_bytes(case)}
        spec_helpers.clear_grads(inputs)  # the measured call creates the gradients (counted)
        info["peak_extra_memory"] = measure.peak_extra_memory(step, DEVICE)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and not benchmark.disabled:
            cell_peaks = {"copy_bytes_per_s": peaks.get("copy_bytes_per_s")}
            if spec.roofline == "gemm":
                key = f"gemm_flops_per_s_{case.dtype_name}"
                cell_peaks[key] = peaks.get(key)
            exps = spec.exps(case) if spec.exps else None
            if exps is not None and DEVICE.type == "cpu":
                cell_peaks["exp_per_s"] = peaks.get("exp_per_s")
            rates = spec_helpers.rates(info["flops"], info["min_bytes"], stats.stats.median,
                                      cell_peaks, case.dtype_name, exps=exps)
            info["gflops_per_s"] = rates["flops_per_s"] / 1e9
            info["gb_per_s"] = rates["min_bytes_per_s"] / 1e9
            for key in ("gemm_peak_fraction", "roofline_fraction", "bandwidth_fraction",
                        "exp_fraction"):
                if key in rates:
                    info[key] = rates[key]
        benchmark.extra_info.update(info)
    return run
