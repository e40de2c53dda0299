#!/usr/bin/env bash
# Device call: re-run the GPU tests touched by a change (in the background, one Triton config per kernel) while
# the A0.3B-2B benches autotune fully in the foreground. Usage: bash tools/gpu_call3.sh
source .gpu/env.sh
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
(GPU_TEST_TIMEOUT=${GPU_TEST_TIMEOUT:-230} GPU_TEST_WORKERS=6 GPU_TEST_CACHE=0 \
  GPU_TEST_PATHS="tests/gpu/test_mixers_gpu.py tests/gpu/test_mixers_recurrent_fla.py tests/gpu/test_train_gpu.py tests/gpu/test_ops_conv_norm_gpu.py tests/gpu/test_ops_gla_gpu.py" \
  bash tools/gpu_tests.sh -k "${GPU_TEST_K:-based or deltanet or linear_attn or train or conv or norm}" > "$OUT/tests_summary.log" 2>&1) &
bench() {  # mixer timeout extra-args
  timeout "$2" python3 -m linear_moe.model.bench --preset A0.3B-2B --mixer "$1" --vocab 32000 --shape 16x2048 \
    --steps 3 --warmup 1 "${@:3}" > "$OUT/bench_$1.log" 2>&1
  grep -E "tokens/s" "$OUT/bench_$1.log"
}
bench gated_deltanet 190 --profile 30
bench gla 240
wait
tail -30 "$OUT/tests_summary.log"
