#!/usr/bin/env bash
# Device call for throughput: the A0.3B-2B benches alone on the GPU (no tests beside them), each time-boxed, logs
# to $OUT. Usage (device machine, repo root, carrying .gpu):
#   bash tools/gpu_bench.sh [MIXER ...]          (default: gated_deltanet gla)
# Env: SHAPES ("16x2048"), BENCH_TIMEOUT (240 s per mixer), BENCH_AUTOTUNE ("few": three Triton configs per fla
# kernel; a cold "full" autotune of the whole step outlasted 265 s), BENCH_ARGS (e.g. "--compile", "--precision
# bf16"), BENCH_TAG (log name suffix). A timed-out bench gets SIGINT, so its log shows where it was.
# Autotune results (Triton's *.autotune.json, kilobytes; env.sh sets TRITON_CACHE_AUTOTUNING=1) go to
# $OUT/triton-cache.tar.gz: copy it to .gpu/ and the next machine's env.sh restores them, so a BENCH_AUTOTUNE=full
# run there compiles only each kernel's best config instead of autotuning from cold.
source .gpu/env.sh
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
shapes=(); for s in ${SHAPES:-16x2048}; do shapes+=(--shape "$s"); done
for m in "${@:-gated_deltanet gla}"; do
  for mixer in $m; do
    log="$OUT/bench_${mixer}${BENCH_TAG:+_$BENCH_TAG}.log"
    timeout -s INT -k 10 "${BENCH_TIMEOUT:-240}" python3 -u -m linear_moe bench model --preset A0.3B-2B \
      --out "$OUT/bench_${mixer}${BENCH_TAG:+_$BENCH_TAG}" --mixer "$mixer" --vocab 32000 "${shapes[@]}" --steps 4 --warmup 2 --autotune "${BENCH_AUTOTUNE:-few}" \
      --profile "${PROFILE_ROWS:-30}" ${BENCH_ARGS:-} > "$log" 2>&1
    echo "== $mixer: $(grep -E 'warm-up|tokens/s' "$log" | tr '\n' ' ') $(grep -m1 -E 'Error' "$log")"
  done
done
(cd "$TRITON_CACHE_DIR" 2>/dev/null && find . -name '*.autotune.json' | tar czf "$OUT/triton-cache.tar.gz" -T - \
  && echo "autotune results: $(tar tzf "$OUT/triton-cache.tar.gz" | wc -l) files -> triton-cache.tar.gz")
