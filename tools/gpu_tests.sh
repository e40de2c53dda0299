#!/usr/bin/env bash
# Run the GPU test suite on a CUDA machine (the H200 device machine: from the repo root; it sources .gpu/env.sh when
# the bundle is there). Results and the Triton cache go to $OUT when it is set. GPU_TEST_TIMEOUT ends pytest with
# SIGINT, so it still prints the failures so far.
[ -f .gpu/env.sh ] && source .gpu/env.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, fla; print('torch', torch.__version__, 'fla', fla.__version__)"
# Several workers: most of the first run is Triton compiling and autotuning fla's kernels (CPU-bound).
timeout -s INT -k 30 "${GPU_TEST_TIMEOUT:-3600}" python3 -m pytest -m gpu ${GPU_TEST_PATHS:-tests/gpu} -v -p no:cacheprovider -p no:benchmark -n "${GPU_TEST_WORKERS:-8}" \
  --junitxml="$OUT/gpu-junit.xml" -rfE "$@" 2>&1 | tee "$OUT/gpu-tests.log" | grep -E "passed|failed|FAILED|ERROR" | tail -60
# The device tool returns files of at most 16 MB: ship the compiled kernels in parts
# (`cat triton-cache.part-* > .gpu/triton-cache.tar.gz` here, and .gpu/env.sh restores them next time).
[ "${GPU_TEST_CACHE:-1}" = 1 ] && tar czf - -C "$TRITON_CACHE_DIR" . 2>/dev/null | split -b 15M -d - "$OUT/triton-cache.part-"
