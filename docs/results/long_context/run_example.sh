#!/usr/bin/env bash
# The worked example of docs/long_context.md: a tiny hybrid trained at 256 tokens, extended to 1024 tokens
# three ways (RoPE kept, DRoPE, YaRN), then measured by loss by position and the RULER-style suite.
# Usage: bash docs/results/long_context/run_example.sh [WORK_DIR]   (default /tmp/long-context-example)
set -euo pipefail
WORK=${1:-/tmp/long-context-example}
OUT=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1  # one thread per process: the CPU times below are per-core seconds
mkdir -p "$WORK"
timed() { /usr/bin/time -f "  [$1] CPU user %U s, sys %S s, wall %e s" "${@:2}"; }

# 0. The embedded corpus with a 2,048-token BPE (the default 8,192 would make the LM head dominate a d=64 model).
DATA=$(python -m hybridlm data embedded --vocab-size 2048 | head -1 | cut -d: -f1)

# 1. Base model: hybrid-tiny (GGGA, d=64), RoPE theta 10,000, 600 steps at 256 tokens.
timed base python -m hybridlm train --run-dir "$WORK/base" --no-progress \
  --set model.preset=hybrid-tiny --set model.overrides.rope_theta=10000.0 \
  --set data.dataset="$DATA" --set data.seq_len=256 --set data.batch_size=8 \
  --set trainer.steps=600 --set schedule.warmup_steps=30 --set trainer.eval_every=200 --set trainer.eval_sequences=32 \
  --set trainer.checkpoint_every=0 --set trainer.log_every=100 --set trainer.sample_tokens=0

# 2. Extension to 1,024 tokens (4x), 200 steps each from the base weights with a fresh optimizer:
#    keep = RoPE as trained, drop = DRoPE (no positional encoding), yarn = YaRN factor 4 over 256 tokens.
for ROPE in keep drop yarn; do
  timed "extend-$ROPE" python -m hybridlm train --run-dir "$WORK/extend-$ROPE" --no-progress \
    --set trainer.init_from="$WORK/base" --set model.rope=$ROPE \
    --set data.dataset="$DATA" --set data.seq_len=1024 --set data.batch_size=2 \
    --set optimizer.lr=1e-3 --set schedule.name=linear --set schedule.warmup_steps=20 \
    --set trainer.steps=200 --set trainer.eval_every=100 --set trainer.eval_sequences=16 \
    --set trainer.checkpoint_every=0 --set trainer.log_every=100 --set trainer.sample_tokens=0
done

MODELS=("$WORK/base" "$WORK/extend-keep" "$WORK/extend-drop" "$WORK/extend-yarn")

# 3. Held-out loss by position up to 4,096 tokens (16x the base length, 4x the extension length).
timed loss python -m hybridlm eval loss "${MODELS[@]}" --data "$DATA" --seq-len 4096 --max-instances 0 \
  --batch-size 2 --out "$OUT/loss"

# 4. RULER-style suite, Python-source prompts (the models read code), up to 8x the base length.
timed ruler python -m hybridlm eval ruler "${MODELS[@]}" --lengths 256,512,1024,2048 \
  --tasks niah_single,niah_multikey,vt,fwe --samples 16 --template code --out "$OUT/ruler"
