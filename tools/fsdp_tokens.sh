#!/usr/bin/env bash
# A0.3B-2B on one GPU: tokens/s and peak memory of the plain trainer (bf16 autocast over float32 weights) against
# FSDP2 at world size 1 (torchrun, NCCL, bf16 parameters, float32 gradient reduction), same data and steps.
# From the repo root on the GPU machine (sources .gpu/env.sh when the bundle is there):
#   MIXER=gla STEPS=40 tools/fsdp_tokens.sh [OUT_DIR]
# RUNS="fsdp" runs only the FSDP2 one (the data are then prepared by `linear-moe prepare` first).
[ -f .gpu/env.sh ] && source .gpu/env.sh
set -euo pipefail
out=${1:-${OUT:-/tmp/gpu-out}/fsdp-tokens}
common=(model.preset=A0.3B-2B "model.mixer=${MIXER:-gla}" data.vocab_size=32000 data.seq_len=2048
  data.micro_batch_size=32 "train.steps=${STEPS:-40}" train.log_every=10 train.eval_every=0 train.eval_batches=0
  train.autotune=few train.sample_tokens=0 train.plot=false train.tensorboard=false train.progress=false)
runs=${RUNS:-plain fsdp}
rm -rf "$out/plain" "$out/fsdp"
data="$out/plain/data"
if [[ " $runs " == *" plain "* ]]; then
  python -m linear_moe train "${common[@]}" "train.run_dir=$out/plain"
  rm -rf "$out/plain/checkpoints"  # ~25 GB of weights and Adam state: keep the disk for the second run
else
  python -m linear_moe prepare builtin:python-docs --out "$data" --vocab-size 32000
fi
torchrun --standalone --nproc-per-node 1 -m linear_moe train "${common[@]}" "data.path=$data" \
  "train.run_dir=$out/fsdp"
rm -rf "$out/fsdp/checkpoints"
python - "$out" $runs <<'PY'
import json, sys
from pathlib import Path

for name in sys.argv[2:]:
    recs = [json.loads(line) for line in (Path(sys.argv[1]) / name / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if r["split"] == "train"][-1]  # the last window: compile and autotune are behind
    print(f"{name:>5}: {last['tokens_per_s'] / 1e3:7.1f}k tokens/s  MFU {100 * (last['mfu'] or 0):5.1f}%  "
          f"peak {last['memory_gb']:.1f} GB  loss {last['loss']:.3f} (step {last['step']})")
PY
