#!/usr/bin/env bash
# One command for a lent GPU machine (the device tool): build against the machine's own
# CUDA torch, run the whole test suite on CUDA tensors, then the GPU benchmark suite, and
# leave logs, JSON and Markdown under $OUT (the device tool brings that folder back).
#
#   device run:  bash bench/gpu.sh            (from the repository root)
#   options:     GPU_SH_SKIP_TESTS=1, GPU_SH_SKIP_BENCH=1, GPU_SH_QUICK=1 (smoke benchmark),
#                GPU_SH_OPS=softmax_kl (one op; default all)
#
# The machine's python3 already has CUDA torch, Triton, pytest, pytest-benchmark and
# hypothesis; nothing is installed. The extension is built in place (no pip), so the
# package runs from this tree with PYTHONPATH=.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
DATE=$(date -u +%Y-%m-%d)

{
    echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version | tail -n 2
} 2>&1 | tee "$OUT/machine.log"

echo "== build (CUDA kernels for sm_80 and sm_90a)"
start=$(date +%s)
if ! CEX_FORCE_CUDA=1 MAX_JOBS=16 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 60 "$OUT/build.log"; echo "gpu.sh: build failed"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
$PY -c "import cex_kernels, torch; print('backends', cex_kernels.backends(), 'on', torch.cuda.get_device_name())"
NAME=$($PY -c "from cex_kernels.benchmarking.measure import short_device_name; print(short_device_name('cuda'))")

status=0
if [ "${GPU_SH_SKIP_TESTS:-0}" != 1 ]; then
    # Up to 25 failures: a device call is too scarce to stop at the first one.
    echo "== tests on CUDA (Triton launched with its first config: no autotuning per test shape)"
    CEX_TRITON_AUTOTUNE=0 $PY -m pytest tests -q -p no:cacheprovider --maxfail=25 \
        --junitxml="$OUT/tests-$NAME-$DATE.xml" 2>&1 | tee "$OUT/tests-$NAME-$DATE.log" | tail -n 40
    status=${PIPESTATUS[0]}
fi

if [ "${GPU_SH_SKIP_BENCH:-0}" != 1 ]; then
    echo "== benchmarks (autotuned)"
    quick=(); [ "${GPU_SH_QUICK:-0}" = 1 ] && quick=(--quick)
    # GPU_SH_OPS: one op (projected_mse, softmax_kl, linear_kl) or all (one JSON/MD per op,
    # named <device>-<date>-<op>); plots when matplotlib imports.
    $PY -m cex_kernels.cli bench --device cuda --op "${GPU_SH_OPS:-all}" "${quick[@]}" \
        --json "$OUT/$NAME-$DATE-{op}.json" --md "$OUT/$NAME-$DATE-{op}.md" --plot "$OUT/plots" \
        2>&1 | tee "$OUT/bench.log" | grep -v '^USDT' | tail -n 150
fi
exit "$status"
