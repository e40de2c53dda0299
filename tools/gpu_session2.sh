#!/usr/bin/env bash
# Second device call: the parity tests the first call could not finish, and throughput at 32K tokens a step.
source .gpu/env.sh
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
(timeout 330 python3 -m pytest -m gpu tests/gpu/test_ops_gla_gpu.py tests/gpu/test_ops_delta_gpu.py -n 6 -v --tb=short \
   -p no:cacheprovider -p no:benchmark -k "(rwkv6 and fused_recurrent and B2) or (gla and chunk and B2) or rwkv7" \
   > "$OUT/tests.log" 2>&1) &
timeout 170 python3 -m linear_moe.model.bench --preset A0.3B-2B --mixer gla --shape 16x2048 --steps 5 --warmup 2 > "$OUT/bench_gla.log" 2>&1
timeout 170 python3 -m linear_moe.model.bench --preset A0.3B-2B --mixer gated_deltanet --shape 16x2048 --steps 5 \
   --warmup 2 > "$OUT/bench_gdn.log" 2>&1
wait
tail -n 4 "$OUT"/bench_*.log; grep -E "PASSED|FAILED" "$OUT/tests.log" | tail -20; grep -E "^E " "$OUT/tests.log" | head -20
