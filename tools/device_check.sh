#!/usr/bin/env bash
# One-command GPU check of lightning-gmc (about 5-8 minutes on one GPU):
#
#   bash tools/device_check.sh
#
# 1. makes a virtual environment (DEVICE_CHECK_VENV, default .venv-device, with the system's site
#    packages so a preinstalled torch is reused) and runs `pip install -e ".[dev]"` into it; offline,
#    it goes on with what is installed (the repository is put on PYTHONPATH either way);
# 2. stops cleanly with "no CUDA device" on a machine without one;
# 3. runs the tests marked `cuda` (tests/strategy/test_cuda.py: every method and compressor through
#    the hook with Lightning on one GPU against the CPU run, bf16-mixed, checkpoint/resume bitwise,
#    two gloo ranks with CUDA tensors);
# 4. runs the benchmarks on the GPU and prints their ratios: sampled top-k vs copy_/clone() and vs
#    torch.topk, the per-bucket pipeline vs clone() (bench_compressors.py), and every method's step
#    time through DDP vs DDP + SGD(momentum) in copies and clones of the gradient (bench_pipeline.py).
#
# Environment: PYTHON (interpreter that makes the venv, default python3), DEVICE_CHECK_VENV,
# DEVICE (default cuda:0), SKIP_TESTS=1 / SKIP_BENCH=1 to run only one half.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${DEVICE_CHECK_VENV:-.venv-device}
DEVICE=${DEVICE:-cuda:0}
status=0

echo "== device_check: environment ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages "$VENV" || { echo "device_check: cannot create $VENV"; exit 1; }
fi
PY="$VENV/bin/python"
if ! "$PY" -m pip install -q -e ".[dev]"; then
    echo "device_check: pip install -e .[dev] failed (offline?); using the installed packages"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import torch, lightning, pytest" 2>/dev/null; then
    echo "device_check: torch, lightning and pytest must be importable from $PY"
    exit 1
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "device_check: no CUDA device on this machine; nothing to check (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
    exit 0
fi
"$PY" - <<'EOF'
import torch
props = torch.cuda.get_device_properties(0)
print(f"== device_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {props.name}, "
      f"{props.total_memory / 2**30:.0f} GiB, NCCL available: {torch.distributed.is_nccl_available()}")
EOF

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    echo "== device_check: tests marked cuda"
    timeout 330 "$PY" -m pytest -q -m cuda tests/strategy/test_cuda.py -p no:cacheprovider || status=1
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    echo "== device_check: compressors and per-bucket pipeline (d = 25M, one segment)"
    timeout 150 "$PY" benchmarks/bench_compressors.py --device "$DEVICE" --layout single --rounds 5 || status=1
    echo "== device_check: every method through DDP, world size 1 (16.8M-parameter Linear)"
    timeout 120 "$PY" benchmarks/bench_pipeline.py --device "$DEVICE" --rounds 10 || status=1
fi

if [ "$status" = 0 ]; then echo "== device_check: all passed"; else echo "== device_check: FAILURES above"; fi
exit $status
