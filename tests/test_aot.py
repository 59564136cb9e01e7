"""Ahead-of-time compiles of the GPU code, on a machine without a GPU.

The Triton interpreter and the CPU build accept code that a GPU toolchain rejects, so
every Triton kernel (each autotune config, each dtype) is compiled for sm_80 and sm_90,
every .cu file is compiled by nvcc for sm_80 and sm_90a, and the torch binding is
compiled with CUDA enabled. Each fails on errors and on register spills; the resource
usage is printed in the test summary.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest

import cex_kernels
from cex_kernels import _backends
from conftest import RESOURCE_REPORTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC_ARCHS = ["sm_80", "sm_90a"]
pytestmark = pytest.mark.aot


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(cuda_home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else None


# Other Triton installs to compile with as well (python executables, ":"-separated), such
# as the Triton a GPU machine runs: scripts/triton_compat_venv.sh makes one; CI sets this.
EXTRA_PYTHONS = [p for p in os.environ.get("CEX_AOT_PYTHONS", "").split(":") if p]


def _triton_version(python):
    return subprocess.run([python, "-c", "import triton; print(triton.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("python", [sys.executable] + EXTRA_PYTHONS,
                         ids=["this-venv"] + [os.path.basename(os.path.dirname(os.path.dirname(p)))
                                              for p in EXTRA_PYTHONS])
def test_triton_kernels_compile_for_sm80_and_sm90(python, tmp_path):
    if not cex_kernels.backends()["triton"]:
        pytest.skip(_backends.unavailable_reason("triton"))
    version = _triton_version(python)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, every time
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    report = tmp_path / "aot.json"
    proc = subprocess.run([python, "-m", "cex_kernels.triton.aot", "--arch", "80", "90",
                           "--json", str(report)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    table = "\n".join(line for line in proc.stdout.splitlines())
    RESOURCE_REPORTS.append(f"Triton {version} kernels, ahead of time (registers, spills, "
                            "shared memory)\n" + table)
    assert proc.returncode == 0, f"AOT compile with Triton {version} failed:\n{table}\n{proc.stderr[-4000:]}"
    assert "0 failed" in table


@pytest.mark.parametrize("source", [os.path.relpath(s, ROOT) for s in CUDA_SOURCES])
def test_cuda_sources_compile_without_spills(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")

    def compile_for(arch):
        cmd = [nvcc, "-std=c++17", "-O3", "-c", os.path.join(ROOT, source),
               "-o", str(tmp_path / f"{arch}.o"), "-gencode",
               f"arch=compute_{arch[3:]},code={arch}", "--resource-usage", "-Xptxas",
               "-warn-spills", "-Xcompiler", "-Wall"]
        return arch, subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    with ThreadPoolExecutor(len(NVCC_ARCHS)) as pool:
        results = list(pool.map(compile_for, NVCC_ARCHS))
    for arch, proc in results:
        log = proc.stdout + proc.stderr
        usage = [line.strip() for line in log.splitlines()
                 if "registers" in line or "spill" in line or "Function properties" in line
                 or "Compiling entry" in line]
        RESOURCE_REPORTS.append(f"nvcc {source} for {arch}\n" + "\n".join(usage))
        assert proc.returncode == 0, f"nvcc failed for {arch}:\n{log[-6000:]}"
        spills = [m for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", log) if int(m)]
        assert not spills, f"register spills for {arch}:\n" + "\n".join(usage)
        assert "Used" in log, f"no resource usage reported for {arch}:\n{log[-2000:]}"


def test_binding_compiles_with_cuda_enabled(tmp_path):
    """The torch binding is only built on CUDA machines; make sure it compiles here too."""
    from torch.utils.cpp_extension import include_paths
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}",
                                                      f"-I{os.path.join(ROOT, 'csrc')}"]
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DCEX_WITH_CUDA=1",
           "-DTORCH_EXTENSION_NAME=_C", *includes, os.path.join(ROOT, "csrc", "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
