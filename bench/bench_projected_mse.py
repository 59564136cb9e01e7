"""pytest-benchmark: projected_mse (ours, every backend that runs here) vs eager vs torch.compile.

The grid (shapes, dtypes, modes, implementations) is ``cex_kernels.bench_specs.PROJECTED_MSE``,
the same one ``bench/report.py`` and ``cex bench`` run. Benchmarks report figures; they assert
nothing about speed. Each benchmark's ``extra_info``: flops (one product pass, 2*N*d_t*d_s),
gflops_per_s (from the median), min_bytes, peak_extra_memory (bytes, one call, see
``bench_utils.peak_extra_memory``) and, when timed, the fraction of the measured peak GEMM
rate.

    python -m pytest bench/bench_projected_mse.py --benchmark-group-by=group --benchmark-sort=name
"""
import pytest

from cex_kernels import bench_specs, bench_utils

SPEC = bench_specs.PROJECTED_MSE
DEVICE = bench_utils.torch.device("cuda" if bench_utils.torch.cuda.is_available() else "cpu")
CASES = SPEC.cases(DEVICE)


@pytest.mark.parametrize("impl", SPEC.impls)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_projected_mse(benchmark, peaks, case, impl):
    reason = SPEC.skip_reason(impl, DEVICE)
    if reason:
        pytest.skip(reason)
    inputs = SPEC.make_inputs(case, DEVICE)
    step = SPEC.make_step(impl, case, inputs)
    warmup, repeats = bench_specs.default_repeats(DEVICE)
    benchmark.group = f"projected_mse {case}"
    benchmark.pedantic(bench_utils.synchronized(step, DEVICE), rounds=repeats,
                       warmup_rounds=warmup, iterations=1)

    info = {"impl": impl, "flops": SPEC.flops(case), "min_bytes": SPEC.min_bytes(case)}
    inputs["student"].grad = None  # the measured call creates the gradient (counted)
    info["peak_extra_memory"] = bench_utils.peak_extra_memory(step, DEVICE)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and not benchmark.disabled:
        rates = bench_specs.rates(info["flops"], info["min_bytes"], stats.stats.median, peaks,
                                  case.dtype_name)
        info["gflops_per_s"] = rates["flops_per_s"] / 1e9
        for key in ("gemm_peak_fraction", "roofline_fraction", "bandwidth_fraction"):
            if key in rates:
                info[key] = rates[key]
    benchmark.extra_info.update(info)
