"""What ``pip install`` gets from a source distribution: every file the extension's build
reads (C++ and CUDA sources, headers, the SIMD include) and the whole Python package."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files_under(folder: str, suffixes) -> set:
    out = set()
    for base, _, names in os.walk(os.path.join(ROOT, folder)):
        if "__pycache__" in base:
            continue
        for name in names:
            if name.endswith(suffixes):
                out.add(os.path.relpath(os.path.join(base, name), ROOT))
    return out


def test_sdist_holds_what_the_build_reads(tmp_path):
    # From a copy without build leftovers: an old *.egg-info/SOURCES.txt in the checkout
    # would add its files to the sdist and hide a missing MANIFEST.in rule.
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "_build_info.py")
    for name in ("cex_kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), tree / name, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), tree / name)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir",
                           str(tmp_path)], cwd=tree, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, CEX_SKIP_CUDA="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [archive] = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = (_files_under("csrc", (".cpp", ".h", ".inc", ".cu", ".cuh"))
              | _files_under("cex_kernels", (".py",)) | {"setup.py", "pyproject.toml",
                                                          "README.md"})
    assert wanted, "nothing found to check"
    missing = sorted(wanted - packed)
    assert not missing, missing


def test_version_is_the_distributions():
    """``cex_kernels.__version__`` and the distribution's version (pyproject.toml) are
    written in two places: they must agree."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    import cex_kernels
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    assert cex_kernels.__version__ == declared
