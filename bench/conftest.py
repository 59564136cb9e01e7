"""pytest setup for the benchmarks: collect ``bench_*.py`` files, and share the device and
its measured peak rates (once per session) between benchmark files."""
import pytest
import torch

from cex_kernels import bench_utils

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
