#!/usr/bin/env bash
# One device-machine call: GPU parity tests in the background, throughput benches in the foreground,
# every part under its own time limit so the logs and the Triton cache always come back in $OUT.
source .gpu/env.sh
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
(timeout "${TEST_S:-420}" python3 -m pytest -m gpu tests/gpu/test_ops_gla_gpu.py tests/gpu/test_ops_delta_gpu.py \
   tests/gpu/test_moe_gpu.py tests/gpu/test_model_gpu.py -n 10 -v -p no:cacheprovider -p no:benchmark \
   > "$OUT/tests.log" 2>&1) &
timeout 60 python3 -m linear_moe.moe.bench > "$OUT/moe_bench.log" 2>&1
timeout 220 python3 -m linear_moe.model.bench --preset A0.3B-2B --mixer gla --steps 5 --warmup 2 > "$OUT/bench_gla.log" 2>&1
timeout 170 python3 -m linear_moe.model.bench --preset A0.3B-2B --mixer gated_deltanet --shape 32x2048 --steps 5 \
   --warmup 2 > "$OUT/bench_gdn.log" 2>&1
wait
# Files come back only up to 16 MB each: ship the compiled kernels in parts (see tools/gpu_tests.sh).
tar czf - -C "$TRITON_CACHE_DIR" . 2>/dev/null | split -b 15M -d - "$OUT/triton-cache.part-"
tail -5 "$OUT"/moe_bench.log "$OUT"/bench_*.log; grep -c PASSED "$OUT/tests.log"; grep FAILED "$OUT/tests.log" | head -30
