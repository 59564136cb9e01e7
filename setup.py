"""Build cex_kernels._C: the C++ CPU kernels always, the CUDA kernels when possible.

Switches (environment variables):
  CEX_FORCE_CUDA=1   build the CUDA kernels even if no GPU is visible (needs nvcc and a
                     CUDA build of PyTorch); fail if either is missing.
  CEX_SKIP_CUDA=1    never build the CUDA kernels.
  CEX_CUDA_ARCHS     semicolon list for TORCH_CUDA_ARCH_LIST (default "8.0;9.0a").
  MAX_JOBS           parallel compile jobs (ninja), as in torch.utils.cpp_extension.

Install with torch already present:  pip install --no-build-isolation .
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # the flash-attention convention: torch first, then us
    sys.exit(
        "cex-kernels: PyTorch must be installed before building (it provides the C++ "
        "headers and the compiler flags). Run `pip install torch` (on a CPU machine "
        "`pip install torch==2.13.0`), then `pip install --no-build-isolation .`.\n"
        f"Import error: {exc}"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _check_cxx_compiler():
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        sys.exit(
            "cex-kernels: no C++ compiler found (looked for $CXX, c++, g++, clang++). The CPU "
            "kernels are always compiled; install one (e.g. `apt-get install g++`) and retry."
        )


def _want_cuda():
    """Decide whether to build the CUDA kernels, explaining the decision."""
    if _flag("CEX_SKIP_CUDA"):
        print("cex-kernels: CEX_SKIP_CUDA=1, building the CPU kernels only")
        return False
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    cuda_torch = torch.version.cuda is not None
    if _flag("CEX_FORCE_CUDA"):
        if not (has_nvcc and cuda_torch):
            sys.exit(
                "cex-kernels: CEX_FORCE_CUDA=1 but "
                + ("nvcc was not found (set CUDA_HOME)" if not has_nvcc else "")
                + (" and " if not has_nvcc and not cuda_torch else "")
                + ("this PyTorch is a CPU build" if not cuda_torch else "")
            )
        return True
    if has_nvcc and cuda_torch:
        return True
    print(
        "cex-kernels: building the CPU kernels only ("
        + ("no nvcc" if not has_nvcc else "PyTorch is a CPU build")
        + "); the triton and reference backends still work on CUDA tensors"
    )
    return False


def _write_build_info(with_cuda):
    """Record the torch this build compiles against: the binary only works with that one,
    and cex_kernels checks it at import instead of failing on a missing symbol (or worse)."""
    path = os.path.join(HERE, "cex_kernels", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; not tracked by git.\n"
                f"TORCH_VERSION = {torch.__version__!r}\n"
                f"WITH_CUDA = {bool(with_cuda)!r}\n")


def extensions():
    _check_cxx_compiler()
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -g0 / -s: no debug information or symbol table in the shipped binary (13 MB -> a
    # fraction of that); the dynamic symbols Python and libtorch need stay.
    strip = ["-s"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++17", "-g0"] + openmp
    want_cuda = _want_cuda()
    _write_build_info(want_cuda)
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    if not want_cuda:
        return [CppExtension("cex_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=openmp + strip)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("CEX_CUDA_ARCHS", "8.0;9.0a"))
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]
    return [CUDAExtension(
        "cex_kernels._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("CEX_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=openmp + strip,
    )]


setup(
    packages=find_packages(include=["cex_kernels", "cex_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
