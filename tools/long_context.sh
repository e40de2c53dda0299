#!/usr/bin/env bash
# Long-context training on one GPU: PRESET (A0.3B-2B, vocab 32K) trains rows of SEQ tokens with the trainer (forward,
# backward, AdamW step): activation checkpointing, the routed experts recomputed in chunks of EXPERT_CHUNK tokens,
# and (OFFLOAD=1) the checkpointed block inputs kept in host memory. The corpus is generated text (SEED-fixed
# pseudo-words, enough tokens for STEPS rows), prepared once under OUT_DIR/data.
# From the repo root on the GPU machine (sources .gpu/env.sh when the bundle is there):
#   SEQ=1048576 MIXER=gla STEPS=3 OFFLOAD=0 tools/long_context.sh [OUT_DIR]
[ -f .gpu/env.sh ] && source .gpu/env.sh
set -euo pipefail
out=${1:-${OUT:-/tmp/gpu-out}/long}
seq=${SEQ:-1048576}
steps=${STEPS:-3}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
data="$out/data"
if [ ! -f "$data/meta.json" ]; then
  mkdir -p "$out/corpus"
  python - "$out/corpus/text.txt" "$(( (seq + 1) * (steps + 1) ))" <<'PY'
import random, sys

rng = random.Random(0)
letters = "abcdefghijklmnopqrstuvwxyz"
# 60,000 distinct words: enough pairs for a 32,000-token BPE vocabulary
words = ["".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(60000)]
target_words = int(sys.argv[2]) // 2 + 100_000  # a word is one or a few tokens once the vocabulary is learnt
with open(sys.argv[1], "w") as f:
    for _ in range(target_words // 12):
        f.write(" ".join(rng.choices(words, k=12)) + ".\n")
PY
  python -m linear_moe prepare "$out/corpus" --out "$data" --vocab-size 32000 --val-fraction 0
fi
rm -rf "$out/run"
python -m linear_moe train "model.preset=${PRESET:-A0.3B-2B}" model.vocab_size=32000 "model.mixer=${MIXER:-gla}" "model.max_seq_len=$seq" \
  "data.path=$data" "data.seq_len=$seq" data.micro_batch_size=1 "train.steps=$steps" train.log_every=1 \
  train.warmup=1 train.eval_every=0 train.eval_batches=0 train.autotune=few train.sample_tokens=0 train.plot=false \
  train.tensorboard=false train.progress=false train.activation_checkpointing=true \
  "train.expert_chunk=${EXPERT_CHUNK:-65536}" "train.offload_activations=$([ "${OFFLOAD:-0}" = 1 ] && echo true || echo false)" \
  "train.run_dir=$out/run"
rm -rf "$out/run/checkpoints"
python - "$out/run/metrics.jsonl" <<'PY'
import json, sys

for r in map(json.loads, open(sys.argv[1])):
    if r["split"] == "train":
        peak = f"peak {r['memory_gb']:.1f} GB" if "memory_gb" in r else ""
        print(f"step {r['step']}: loss {r['loss']:.3f}  {r['tokens_per_s'] / 1e3:.1f}k tokens/s  {peak}")
PY
