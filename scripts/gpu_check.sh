#!/usr/bin/env bash
# One prepared GPU check of rwkv-chat's CUDA path; see scripts/gpu_check.py for what it checks.
# For a machine with one NVIDIA GPU (H100/H200 class), a CUDA build of torch, nvcc and ninja, and
# NO network. Run from anywhere; finishes in under 8 minutes (global guard: --budget, default
# 440 s, plus this script's hard `timeout`). Results: $OUT/gpu_check.log and gpu_check.json
# ($OUT defaults to /tmp/rwkv-gpu-check), the console copy in $OUT/gpu_check_console.log.
#
# The reference rwkv==0.8.32 (and, if the checkout's own package cannot be imported, rwkv-chat) are
# installed from wheels in .whl/ at the repo root when not importable. Prepare them where there is
# network, in the repo root (.whl/ is git-ignored; pass it along, e.g. `carry: [".whl"]`):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl rwkv==0.8.32
#   python3 -m pip wheel --no-deps --no-build-isolation -w .whl .     # optional: rwkv-chat itself
# rwkv's own dependency (tokenizers) is not needed for the checks.
#
# Usage: bash scripts/gpu_check.sh [--device cpu] [--budget S] [--sections env,build,...]
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/rwkv-gpu-check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import rwkv.model" >/dev/null 2>&1 || ! "$PYTHON" -c "import rwkv_chat.engine" >/dev/null 2>&1; then
    site=/tmp/gpu-check-site
    wheels=$(ls .whl/rwkv-0.8.32-*.whl 2>/dev/null; "$PYTHON" -c "import rwkv_chat.engine" >/dev/null 2>&1 || ls .whl/rwkv_chat-*.whl 2>/dev/null)
    if [ -n "$wheels" ]; then
        echo "installing from .whl/: $wheels"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" $wheels \
            && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "WARNING: rwkv==0.8.32 is not importable and .whl/ has no wheel for it: the reference rows will FAIL"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

timeout -k 10 470 "$PYTHON" -u scripts/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check_console.log"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "TIMEOUT: scripts/gpu_check.py was stopped by the 470 s hard limit" | tee -a "$OUT_DIR/gpu_check_console.log"
exit "$status"
