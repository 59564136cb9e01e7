#!/usr/bin/env bash
# Set up (or update) a virtual environment with PyTorch, Triton and cex-kernels built in
# place. Idempotent: a second run reuses the venv and only rebuilds what changed.
#
#   CEX_VENV=path            where the venv lives (default .venv)
#   CEX_TORCH_SPEC=spec      torch to install when the venv has none (default torch==2.13.0,
#                            a CPU build; a bare `torch` would pull a multi-GB CUDA build)
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
"${PIP[@]}" install setuptools wheel ninja
# torch is already present, so the build uses it (no isolated build fetching another torch).
echo "setup: building cex-kernels (C++ CPU kernels; CUDA kernels when nvcc + CUDA torch)"
"${PIP[@]}" install --no-build-isolation -e ".[dev,bench]"
"$VENV/bin/python" -c "import cex_kernels, torch; print('setup: torch', torch.__version__, '| backends', cex_kernels.backends())"
