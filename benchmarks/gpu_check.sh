#!/usr/bin/env bash
# The GPU check, at most ~8 minutes on a machine with an NVIDIA GPU: install the project, run the tests marked
# `cuda`, then train ViT-Tiny (vit-12x192), its Mobile V-MoE (vmoe-12x192) and timm's ViT-Tiny at 224 px on
# GPU-resident synthetic data in bf16 through the trainer's own step, and print images/s of each
# (benchmarks/train_throughput.py; JSON in results/benchmarks/gpu_check.json).
#
#   benchmarks/gpu_check.sh [--steps 20] [--skip-install]
#   DEVICE=cpu BATCH=2 benchmarks/gpu_check.sh --steps 1 --skip-install    # a dry run on the CPU
#
# --steps: timed rounds; each model takes 2 steps per round, after 3 warm-up steps.
# Environment: DEVICE (cuda), PRECISION (bf16), BATCH (256), VENV (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=20
INSTALL=1
while [ $# -gt 0 ]; do
    case "$1" in
        --steps) STEPS=$2; shift 2 ;;
        --skip-install) INSTALL=0; shift ;;
        *) echo "gpu_check.sh: unknown option $1 (use --steps N, --skip-install)" >&2; exit 2 ;;
    esac
done
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
BATCH=${BATCH:-256}
VENV=${VENV:-.venv}
PY=$VENV/bin/python
start=$SECONDS

if [ "$INSTALL" = 1 ]; then
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1   # together: a lone torch pulls another build
    "$PY" -m pip install -q -e '.[dev]'
    echo "installed in $((SECONDS - start)) s"
fi
if [[ $DEVICE == cuda* ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU here (torch.cuda.is_available() is False); DEVICE=cpu runs it on the CPU" >&2
    exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"

timeout 180 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/

timeout 300 "$PY" benchmarks/train_throughput.py --dense vit-12x192 --moe vmoe-12x192 --device "$DEVICE" \
    --precision "$PRECISION" --batch-size "$BATCH" --rounds "$STEPS" --steps 2 --threads 4 \
    --out results/benchmarks/gpu_check.json
echo "gpu check done in $((SECONDS - start)) s"
