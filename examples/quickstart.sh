#!/usr/bin/env bash
# The main job on the embedded default, on CPU in minutes: a tiny random Qwen2.5-VL learns synthetic video
# and image questions by SFT, then RAL (GRPO + the attention loss) on 2 gloo processes; held-out accuracy
# of the base, SFT and RL models; the final checkpoint exported to Hugging Face format.
#
#   bash examples/quickstart.sh                 # everything under runs/quickstart in the repository
#   bash examples/quickstart.sh --out DIR       # or OUT=DIR; a non-empty DIR this script did not create is
#                                               # refused (untouched) unless --force
#   bash examples/quickstart.sh --distill       # RAL + on-policy distillation from a larger tiny teacher
#                                               # (under runs/quickstart_distill unless --out)
#
# 1. set up .venv (torch first), 2. tiny HF checkpoint -> Megatron-Core checkpoint, 3. synthetic Video-R1
# dataset with a held-out split, 4. SFT (examples/configs/quickstart_sft.yaml), 5. RAL from the SFT
# checkpoint (examples/configs/quickstart_ral.yaml), 6. export to HF and load it with transformers,
# 7. summary.json and curves.png. Smaller runs for tests: RECORDS=N SFT_EPOCHS=E RL_STEPS=S.
# --distill: 2. also the teacher (TEACHER_PRESET, default small: more layers, width and heads, the same
# tokenizer), 4. also SFT of the teacher (TEACHER_SFT_EPOCHS, default 4: it answers better than the
# student), 5. RAL + GKD + attention distillation to the teacher (examples/configs/quickstart_distill.yaml,
# DISTILL_STEPS, default 40) instead of RAL; the summary adds the teacher's accuracy and the divergences
# to the teacher at the start and the end of the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STARTED="$(date +%s)"

# --- output directory: checked before anything else runs (examples/out_dir_guard.sh) -----------------
source "$ROOT/examples/out_dir_guard.sh"
DISTILL=0
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == "--distill" ]]; then DISTILL=1; else ARGS+=("$arg"); fi
done
OUT_DIR_EXTRA_USAGE="  --distill   RAL + on-policy distillation from a larger tiny teacher (default --out runs/quickstart_distill)"
DEFAULT_OUT="runs/quickstart"
if [[ "$DISTILL" == 1 ]]; then DEFAULT_OUT="runs/quickstart_distill"; fi
out_dir_parse_args "$DEFAULT_OUT" ${ARGS[@]+"${ARGS[@]}"}   # OUT (absolute), FORCE
out_dir_claim "$OUT" "$FORCE"               # refuses a foreign non-empty directory, leaving it untouched
# ------------------------------------------------------------------------------------------------------

cd "$ROOT"
PRESET="${PRESET:-tiny}"
RECORDS="${RECORDS:-400}"
SFT_EPOCHS="${SFT_EPOCHS:-2}"
RL_STEPS="${RL_STEPS:-80}"
TEACHER_PRESET="${TEACHER_PRESET:-small}"
TEACHER_SFT_EPOCHS="${TEACHER_SFT_EPOCHS:-4}"
DISTILL_STEPS="${DISTILL_STEPS:-40}"
NPROC="${NPROC:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE="${WANDB_MODE:-offline}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

bash scripts/setup.sh
PY="$ROOT/.venv/bin/python"
TORCHRUN=("$ROOT/.venv/bin/torchrun" --standalone --nproc-per-node "$NPROC")
step() { printf '\n=== %s\n' "$*"; }
DATA="$OUT/data"
PATHS=("model.load=$OUT/mcore" "data.train_files=[$DATA/train.json]" "data.eval_files=[$DATA/test.json]"
       "data.media_root=$DATA")

step "1/6 tiny Qwen2.5-VL checkpoint (random weights, BPE tokenizer with the Qwen special tokens) -> Megatron-Core"
"$PY" tools/make_tiny_checkpoint.py --out "$OUT/hf" --preset "$PRESET" --seed 0
"$PY" tools/convert_hf_to_megatron.py --hf "$OUT/hf" --out "$OUT/mcore"
if [[ "$DISTILL" == 1 ]]; then
  echo "the teacher: preset $TEACHER_PRESET (same tokenizer and vision patching, larger)"
  "$PY" tools/make_tiny_checkpoint.py --out "$OUT/teacher_hf" --preset "$TEACHER_PRESET" --seed 1
  "$PY" tools/convert_hf_to_megatron.py --hf "$OUT/teacher_hf" --out "$OUT/teacher_mcore"
fi

step "2/6 synthetic Video-R1-style dataset: $RECORDS VP9 videos and images, 30% held out"
"$PY" tools/make_synthetic_videos.py --out "$DATA" --n "$RECORDS" --seed 0 --heldout-fraction 0.3

step "3/6 SFT on $NPROC gloo processes (held-out accuracy of the base model first, then of the SFT model)"
"${TORCHRUN[@]}" -m megatron_ral.train --config examples/configs/quickstart_sft.yaml "${PATHS[@]}" \
  "training.run_dir=$OUT/sft" "training.epochs=$SFT_EPOCHS"

if [[ "$DISTILL" == 1 ]]; then
  step "3b/6 SFT of the teacher on $NPROC gloo processes ($TEACHER_SFT_EPOCHS epochs: a better model than the student)"
  "${TORCHRUN[@]}" -m megatron_ral.train --config examples/configs/quickstart_sft.yaml "${PATHS[@]}" \
    "model.load=$OUT/teacher_mcore" "training.run_dir=$OUT/teacher_sft" "training.epochs=$TEACHER_SFT_EPOCHS" \
    "training.eval_at_start=false"

  step "4/6 RAL + distillation from the teacher (mu x GKD + gamma_attn x JSD to the teacher's last-layer attention)"
  RL_DIR="$OUT/distill"
  "${TORCHRUN[@]}" -m megatron_ral.train --config examples/configs/quickstart_distill.yaml "${PATHS[@]}" \
    "model.load=$OUT/sft/checkpoints" "algorithm.teacher_load=$OUT/teacher_sft/checkpoints" \
    "training.run_dir=$RL_DIR" "training.train_steps=$DISTILL_STEPS"
  SUMMARY_EXTRA=(--teacher "$OUT/teacher_sft")
else
  step "4/6 RAL from the SFT checkpoint (GRPO + lambda_attn x A x JSD of the last-layer attention policy)"
  RL_DIR="$OUT/ral"
  "${TORCHRUN[@]}" -m megatron_ral.train --config examples/configs/quickstart_ral.yaml "${PATHS[@]}" \
    "model.load=$OUT/sft/checkpoints" "training.run_dir=$RL_DIR" "training.train_steps=$RL_STEPS"
  SUMMARY_EXTRA=()
fi

step "5/6 export the final checkpoint to Hugging Face format and load it with transformers"
"$PY" tools/convert_megatron_to_hf.py --ckpt "$RL_DIR/checkpoints" --out "$OUT/hf_final"
"$PY" - "$OUT/hf_final" <<'PY'
import sys
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32)
AutoProcessor.from_pretrained(sys.argv[1])
print(f"transformers loads {sys.argv[1]}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
PY

step "6/6 summary"
"$PY" -m megatron_ral.cli.summary --sft "$OUT/sft" --rl "$RL_DIR" --train "$DATA/train.json" \
  --heldout "$DATA/test.json" --checkpoint "$RL_DIR/checkpoints" --hf-export "$OUT/hf_final" \
  --out "$OUT/summary.json" --started "$STARTED" --curves "$OUT/curves.png" ${SUMMARY_EXTRA[@]+"${SUMMARY_EXTRA[@]}"} > /dev/null
"$PY" - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
teacher = ""
if "accuracy_teacher" in s:
    teacher = (f"\nteacher: held-out accuracy {s['accuracy_teacher']:.3f}; the student's attention JSD to it "
               f"{s['attn_jsd_teacher_first_quarter']:.4f} -> {s['attn_jsd_teacher_last_quarter']:.4f}, GKD "
               f"{s['gkd_first_quarter']:.4f} -> {s['gkd_last_quarter']:.4f} (first / last quarter of the steps)")
print(f"""
held-out accuracy ({s['heldout_records']} records, greedy):  base {s['accuracy_base']:.3f}   SFT {s['accuracy_sft']:.3f}   RL {s['accuracy_rl']:.3f}   (chance {s['chance_accuracy']:.3f})
RL reward/total, mean of the first and last quarter of {s['rl_steps']} steps:  {s['reward_first_quarter']:.3f} -> {s['reward_last_quarter']:.3f}{teacher}
wall time: {s['wall_seconds'] / 60:.1f} min

outputs:
  summary            {sys.argv[1]}
  training curves    {s['curves']}
  RL run             {s['run_dir']}  (metrics.jsonl, checkpoints/)
  SFT run            {s['sft_run_dir']}
  final checkpoint   {s['checkpoint_dir']}  (Megatron-Core, loads at any TP/PP)
  Hugging Face       {s['hf_export_dir']}
  held-out records   {s['heldout_data']}""")
PY
printf '\nquickstart done: outputs in %s\n' "$OUT"
