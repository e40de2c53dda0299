#!/usr/bin/env bash
# Device call for throughput: the A0.3B-2B benches alone on the GPU (full autotuning, no tests beside them), each
# time-boxed, logs to $OUT. Usage (device machine, repo root, carrying .gpu):
#   bash tools/gpu_bench.sh [MIXER ...]          (default: gated_deltanet gla)
# Env: SHAPES ("16x2048"), BENCH_TIMEOUT (280 s per mixer; cold autotuning took 130-200 s for Gated DeltaNet), BENCH_ARGS (e.g. "--compile" or "--precision bf16").
source .gpu/env.sh
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
shapes=(); for s in ${SHAPES:-16x2048}; do shapes+=(--shape "$s"); done
for m in "${@:-gated_deltanet gla}"; do
  for mixer in $m; do
    log="$OUT/bench_${mixer}${BENCH_TAG:+_$BENCH_TAG}.log"
    timeout "${BENCH_TIMEOUT:-280}" python3 -m linear_moe.model.bench --preset A0.3B-2B --mixer "$mixer" --vocab 32000 \
      "${shapes[@]}" --steps 4 --warmup 1 --profile "${PROFILE_ROWS:-30}" ${BENCH_ARGS:-} > "$log" 2>&1
    echo "== $mixer: $(grep -E 'tokens/s' "$log" | tr '\n' ' ') $(grep -m1 -E 'Error' "$log")"
  done
done
