#!/usr/bin/env bash
# GPU check of aerosynth's generation stage, for a machine with a CUDA GPU (under 8 minutes on one H100-class GPU):
#   1. the tests marked `gpu` (python -m pytest -m gpu -q), then
#   2. benchmarks/gpu_check.py: stage-A s/it and 512 px DDIM sampling images/s of an SD-1.x-sized model built
#      from config, fp16 autocast, batch 4, attention capture on vs off -> benchmarks/results/gpu_check.json
# Usage: benchmarks/gpu_check.sh [gpu_check.py options, e.g. --precision bf16]
# Environment: PYTHON (default python), GPU_CHECK_TESTS (pytest paths, default tests),
#              GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT (seconds, default 180 / 300).
# Exits 2 with a message when torch sees no CUDA GPU; otherwise with the first failing step's status.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False);" \
         "run this on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
"$PYTHON" -c 'import torch; print("gpu_check.sh:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'
echo "== 1/2 python -m pytest -m gpu -q ${GPU_CHECK_TESTS:-tests}"
# shellcheck disable=SC2086
# one process on the one GPU (no xdist workers; pyproject's addopts ask for two), whether or not xdist is installed
timeout "${GPU_CHECK_TEST_TIMEOUT:-180}" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -p no:xdist -o addopts=-ra \
    ${GPU_CHECK_TESTS:-tests}
echo "== 2/2 benchmarks/gpu_check.py $*"
timeout "${GPU_CHECK_BENCH_TIMEOUT:-300}" "$PYTHON" benchmarks/gpu_check.py "$@"
