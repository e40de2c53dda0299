#!/usr/bin/env bash
# Device calls for throughput, alone on the GPU (no tests beside them), each bench time-boxed, logs and results in $OUT.
# Usage (device machine, repo root, carrying .gpu):
#   bash tools/gpu_bench.sh [MIXER ...]          model bench + profile of BENCH_PRESET per mixer (default: gated_deltanet gla)
#   bash tools/gpu_bench.sh --suite [PART ...]   the issue-15 suite, PARTs in order (default: model peers, ~7-9 min):
#     model   A0.3B-2B training step of gla, gated_deltanet, lightning_attn and softmax attention at 2K/16K/32K/64K
#             tokens per sequence, 65,536 tokens a step (32x2048, 4x16384, 2x32768, 1x65536), one process per mixer
#             (SUITE_TIMEOUT s each, default 95), merged by `linear-moe bench report` into $OUT/model/model.{json,png}
#     peers   our A0.3B-2B GLA beside Hugging Face Qwen2-MoE and fla's dense GLA at 2K and 16K ($OUT/peers/, 140 s)
#     layer   one mixer layer fwd+bwd of the same mixers at 2K-64K ($OUT/layer/, 150 s)
#     kernel  chunk_gla, chunk_simple_gla, chunk_gated_delta_rule vs causal SDPA at 2K-64K ($OUT/kernel/, 120 s)
#     decode  per-token latency and memory after 2K/16K/64K tokens of context ($OUT/decode/, 180 s)
#   (`--suite layer kernel decode` is a second call of ~6-8 min.)
# Env: BENCH_AUTOTUNE ("few": three Triton configs per fla kernel; a cold "full" autotune of the whole step outlasted
# 265 s); per-mixer mode: SHAPES ("16x2048"), BENCH_TIMEOUT (240 s per mixer), BENCH_ARGS (e.g. "--compile",
# "--precision bf16", "--activation-checkpointing"), BENCH_PRESET (A0.3B-2B), BENCH_TAG (log name suffix), PROFILE_ROWS
# (30); suite: SUITE_MIXERS ("gla gated_deltanet lightning_attn attention"), SUITE_TIMEOUT. The issue-15 rows beyond
# the suite: `SHAPES=1x131072 BENCH_ARGS=--activation-checkpointing bash tools/gpu_bench.sh gla` and
# `BENCH_PRESET=A1B-7B SHAPES=4x8192 bash tools/gpu_bench.sh gla`.
# A timed-out bench gets SIGINT, so its log shows where it was; each bench rewrites its JSON after every record.
# Autotune results (Triton's *.autotune.json, kilobytes; env.sh sets TRITON_CACHE_AUTOTUNING=1) go to
# $OUT/triton-cache.tar.gz: copy it to .gpu/ and the next machine's env.sh restores them, so a BENCH_AUTOTUNE=full
# run there compiles only each kernel's best config instead of autotuning from cold.
source .gpu/env.sh
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
autotune=(--autotune "${BENCH_AUTOTUNE:-few}")

# bench NAME SECONDS MODE ARGS...: one time-boxed `linear-moe bench MODE` writing $OUT/NAME/ and $OUT/NAME.log
bench() {
  local name=$1 limit=$2; shift 2
  timeout -s INT -k 10 "$limit" python3 -u -m linear_moe bench "$@" --out "$OUT/$name" "${autotune[@]}" > "$OUT/$name.log" 2>&1
  echo "== $name (exit $?): $(grep -E '^  .*(warm-up|: [0-9,]+ tokens/s|tokens/s x)' "$OUT/$name.log" | tr -s ' ' \
    | tr '\n' ' ') $(grep -m1 -E '^error:|Error' "$OUT/$name.log")"
  grep '^|' "$OUT/$name.log"  # the Markdown table of the run
}

if [ "${1:-}" = --suite ]; then
  shift
  mixers=(${SUITE_MIXERS:-gla gated_deltanet lightning_attn attention})
  lens=2048,16384,32768,65536
  for part in "${@:-model peers}"; do
    for p in $part; do
      case $p in
        model)
          for m in "${mixers[@]}"; do
            bench "model_$m" "${SUITE_TIMEOUT:-95}" model --preset A0.3B-2B --vocab 32000 --mixer "$m" \
              --shape 32x2048 --shape 4x16384 --shape 2x32768 --shape 1x65536 --steps 3 --warmup 2
          done
          python3 -m linear_moe bench report "$OUT"/model_*/model.json --out "$OUT/model" ;;
        peers) bench peers 140 peers --preset A0.3B-2B --vocab 32000 --mixer gla --seq-len 2048,16384 --steps 3 --warmup 2 ;;
        layer) bench layer 150 layer --preset A0.3B-2B --mixer "$(IFS=,; echo "${mixers[*]}")" --seq-len "$lens" --steps 5 ;;
        kernel) bench kernel 120 kernel --family gla,simple_gla,gated_delta_rule --seq-len "$lens" --steps 5 ;;
        decode) bench decode 180 decode --preset A0.3B-2B --vocab 32000 --mixer "$(IFS=,; echo "${mixers[*]}")" \
          --context 2048,16384,65536 --steps 32 ;;
        *) echo "unknown suite part $p (model peers layer kernel decode)"; exit 2 ;;
      esac
    done
  done
else
  shapes=(); for s in ${SHAPES:-16x2048}; do shapes+=(--shape "$s"); done
  for m in "${@:-gated_deltanet gla}"; do
    for mixer in $m; do
      bench "bench_${mixer}${BENCH_TAG:+_$BENCH_TAG}" "${BENCH_TIMEOUT:-240}" model --preset "${BENCH_PRESET:-A0.3B-2B}" --mixer "$mixer" \
        --vocab 32000 "${shapes[@]}" --steps 4 --warmup 2 --profile "${PROFILE_ROWS:-30}" ${BENCH_ARGS:-}
    done
  done
fi
(cd "$TRITON_CACHE_DIR" 2>/dev/null && find . -name '*.autotune.json' | tar czf "$OUT/triton-cache.tar.gz" -T - \
  && echo "autotune results: $(tar tzf "$OUT/triton-cache.tar.gz" | wc -l) files -> triton-cache.tar.gz")
