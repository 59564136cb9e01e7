#!/usr/bin/env bash
# A small venv with another Triton release, for compiling the kernels ahead of time with the
# Triton a GPU machine has (the lent H100/H200 machines run Triton 3.6; we develop on 3.9).
#
#   bash scripts/triton_compat_venv.sh 3.6.0     -> .venv-triton-3.6.0/bin/python
#
# It installs only Triton; torch and everything else come from the main venv (.venv, made by
# scripts/setup.sh) through a .pth file, which Python reads after the venv's own
# site-packages, so this Triton shadows the main venv's. Then, with the repository on
# PYTHONPATH:  CEX_AOT_PYTHONS=.venv-triton-3.6.0/bin/python pytest tests/test_aot.py
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: triton_compat_venv.sh TRITON_VERSION}
MAIN=${CEX_VENV:-.venv}
VENV=.venv-triton-$VERSION
[ -x "$MAIN/bin/python" ] || { echo "run scripts/setup.sh first ($MAIN is missing)"; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
    "$MAIN/bin/python" -m venv --without-pip "$VENV"
fi
main_site=$("$MAIN/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
own_site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$main_site" > "$own_site/main-venv.pth"
"$MAIN/bin/python" -m pip --disable-pip-version-check -q install --no-deps \
    --target "$own_site" --upgrade "triton==$VERSION"
"$VENV/bin/python" -c "import triton, torch; assert triton.__version__ == '$VERSION', triton.__version__
print('triton', triton.__version__, 'with torch', torch.__version__, 'in $VENV')"
