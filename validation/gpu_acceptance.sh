#!/usr/bin/env bash
# GPU acceptance in one command: TensorRT engines, parity and latency for the built-in VILA and a
# LLaVA-1.5-7B-shaped model (see validation/gpu_acceptance.py). Installs nothing; on a machine
# without a GPU it prints "skipped: no GPU" and exits 0.
#
#   validation/gpu_acceptance.sh [OUT_PREFIX] [options of validation/gpu_acceptance.py]
#   validation/gpu_acceptance.sh /tmp/acceptance --quick      # -> /tmp/acceptance.json, .txt
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3); it needs a CUDA build
# of torch, tensorrt (10 or newer) and this project's dependencies.
set -euo pipefail

out=gpu_acceptance
if [[ $# -gt 0 && "$1" != -* ]]; then
    out="$1"
    shift
fi
if [[ "$out" != /* ]]; then
    out="$PWD/$out"  # relative to where the script was called from, not the repository
fi

cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi

exec "$py" -m validation.gpu_acceptance --json "$out.json" --text "$out.txt" "$@"
