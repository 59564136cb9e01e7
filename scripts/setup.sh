#!/usr/bin/env bash
# Set up (or update) a virtual environment with PyTorch, Triton and cex-kernels built in
# place. Idempotent: a second run reuses the venv and skips the build when nothing it
# depends on changed (a few seconds).
#
#   CEX_VENV=path            where the venv lives (default .venv)
#   CEX_TORCH_SPEC=spec      torch to install when the venv has none (default torch==2.13.0:
#                            the CPU build where pip finds a local CPU wheel, as on this
#                            project's machines; from PyPI on Linux x86-64 the CUDA build)
#   CEX_SYSTEM_SITE=1        let the venv see the system's packages (a GPU machine's own
#                            CUDA torch and triton) instead of installing torch
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CEX_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${CEX_TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    if [ "${CEX_SYSTEM_SITE:-0}" = 1 ]; then
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC"
    "${PIP[@]}" install "$TORCH_SPEC"
fi
# Nothing to rebuild when the sources, the build files, the torch and the build switches
# are those of the last successful build here (pip would rebuild everything in a fresh
# temporary folder).
STAMP="$VENV/.cex-build-stamp"
stamp() {
    {
        cat setup.py pyproject.toml
        find csrc -type f | LC_ALL=C sort | xargs cat
        "$VENV/bin/python" -c "import torch; print(torch.__version__)"
        env | { grep -E '^(CEX_|MAX_JOBS=|CUDA_HOME=|CXX=)' || true; } | LC_ALL=C sort
    } | sha256sum | cut -d' ' -f1
}
current=$(stamp)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$current" ] \
        && "$VENV/bin/python" -c "import cex_kernels._C" 2>/dev/null; then
    echo "setup: cex-kernels is up to date (nothing changed since the last build)"
else
    "$VENV/bin/python" -c "import setuptools, wheel, ninja" 2>/dev/null \
        || "${PIP[@]}" install setuptools wheel ninja
    # torch is already present, so the build uses it (no isolated build fetching another torch).
    echo "setup: building cex-kernels (C++ CPU kernels; CUDA kernels when nvcc + CUDA torch)"
    rm -f "$STAMP"
    "${PIP[@]}" install --no-build-isolation -e ".[dev,bench]"
    echo "$current" > "$STAMP"
fi
"$VENV/bin/python" -c "import cex_kernels, torch; print('setup: torch', torch.__version__, '| backends', cex_kernels.backends())"
