#!/usr/bin/env bash
# One device call: the GPU tests (when GPU_TEST_TIMEOUT > 0), then throughput + profile of the
# A0.3B-2B preset per mixer, and
# the Triton cache back in parts. Usage (device machine, repo root): bash tools/gpu_call.sh MIXER [MIXER...]
source .gpu/env.sh
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ "${GPU_TEST_TIMEOUT:-0}" -gt 0 ] && bash tools/gpu_tests.sh > "$OUT/tests_summary.log" 2>&1
tail -40 "$OUT/tests_summary.log" 2>/dev/null
for m in "$@"; do
  timeout "${BENCH_TIMEOUT:-200}" python3 -m linear_moe.model.bench --preset A0.3B-2B --mixer "$m" --vocab 32000 \
    --shape 16x2048 --steps ${BENCH_STEPS:-4} --warmup ${BENCH_WARMUP:-2} --profile "${PROFILE_ROWS:-40}" ${BENCH_ARGS:-} > "$OUT/bench_$m.log" 2>&1
  grep -E "tokens/s|Error|error" "$OUT/bench_$m.log" | tail -5
done
