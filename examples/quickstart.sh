#!/usr/bin/env bash
# The end-to-end tour on the embedded default: a tiny random Qwen2.5-VL checkpoint and synthetic videos, on CPU.
#
#   bash examples/quickstart.sh                 # everything under runs/quickstart in the repository
#   bash examples/quickstart.sh --out DIR       # or OUT=DIR; a non-empty DIR this script did not create is
#                                               # refused (untouched) unless --force
#
# 1. set up .venv (torch first), 2. write the tiny HF checkpoint, 3. convert it to a Megatron-Core
# distributed checkpoint and back to HF (bit-exact), 4. write a synthetic Video-R1-style dataset (VP9),
# 5. preprocess one video exactly as Qwen2.5-VL does, 6. generate from it with the KV cache at TP=2 on
# two gloo processes, 7. dump the last-layer attention-policy rows (the quantity RAL trains) for a response.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# --- output directory: checked before anything else runs (examples/out_dir_guard.sh) -----------------
source "$ROOT/examples/out_dir_guard.sh"
out_dir_parse_args "runs/quickstart" "$@"   # OUT (absolute), FORCE
out_dir_claim "$OUT" "$FORCE"               # refuses a foreign non-empty directory, leaving it untouched
# ------------------------------------------------------------------------------------------------------

cd "$ROOT"
PRESET="${PRESET:-tiny}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE="${WANDB_MODE:-offline}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

bash scripts/setup.sh
PY="$ROOT/.venv/bin/python"
TORCHRUN="$ROOT/.venv/bin/torchrun"
step() { printf '\n=== %s\n' "$*"; }

step "1/6 tiny Qwen2.5-VL checkpoint (HF format, random weights, BPE tokenizer with the Qwen special tokens)"
"$PY" tools/make_tiny_checkpoint.py --out "$OUT/hf" --preset "$PRESET" --seed 0

step "2/6 HF -> Megatron-Core distributed checkpoint -> HF (round trip)"
"$PY" tools/convert_hf_to_megatron.py --hf "$OUT/hf" --out "$OUT/mcore"
"$PY" tools/convert_megatron_to_hf.py --ckpt "$OUT/mcore" --out "$OUT/hf_roundtrip"
"$PY" - "$OUT/hf" "$OUT/hf_roundtrip" <<'PY'
import sys
from safetensors import safe_open
from pathlib import Path
def tensors(d):
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
assert a.keys() == b.keys(), "tensor names differ"
bad = [k for k in a if a[k].dtype != b[k].dtype or not (a[k] == b[k]).all()]
assert not bad, f"tensors differ: {bad[:5]}"
print(f"round trip bit-exact: {len(a)} tensors")
PY

step "3/6 synthetic Video-R1-style dataset (VP9 videos + images, train/test records)"
"$PY" tools/make_synthetic_videos.py --out "$OUT/data" --n 12 --seed 0 --json
VIDEO="$OUT/data/$("$PY" -c "import json,sys; r=[x for x in json.load(open(sys.argv[1])) if x['data_type']=='video'][0]; print(r['path'])" "$OUT/data/train.json")"
QUESTION="$("$PY" -c "import json,sys; r=[x for x in json.load(open(sys.argv[1])) if x['data_type']=='video'][0]; print(r['problem'])" "$OUT/data/train.json")"
echo "video: $VIDEO"
echo "question: $QUESTION"

step "4/6 preprocess the video exactly as Qwen2.5-VL (frame indices, smart resize, patches, M-RoPE ids)"
"$PY" tools/preprocess.py --hf "$OUT/hf" --video "$VIDEO" --prompt "$QUESTION" --fps 2 --out "$OUT/sample.pt" --json

step "5/6 generate with the KV cache, tensor parallel over 2 gloo processes"
"$TORCHRUN" --standalone --nproc-per-node 2 tools/generate.py --ckpt "$OUT/mcore" --tp 2 --pp 1 --prompt "$QUESTION" --video "$VIDEO" \
  --max-new-tokens 16 --greedy --json | tee "$OUT/generation.json"

step "6/6 attention-policy rows of the last layer for that response (what RAL trains)"
RESPONSE="$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['text'])" "$OUT/generation.json")"
"$PY" tools/dump_attention.py --ckpt "$OUT/mcore" --tp 1 --pp 1 --prompt "$QUESTION" --video "$VIDEO" \
  --response "$RESPONSE" --out "$OUT/attention.pt"
"$PY" - "$OUT/attention.pt" <<'PY'
import sys, torch
d = torch.load(sys.argv[1])
rows, P = d["rows"], d["prompt_length"]
print(f"rows {tuple(rows.shape)}, prompt length {P}, row sums {rows.sum(-1).min():.6f}..{rows.sum(-1).max():.6f}")
PY
cat <<EOF

quickstart done: outputs in $OUT
  hf/               tiny random Qwen2.5-VL, Hugging Face format (weights, tokenizer, processor); its text is
                    random until the model is trained
  mcore/            the same weights as a Megatron-Core distributed checkpoint (loads at any TP/PP)
  hf_roundtrip/     mcore/ converted back to Hugging Face format (bit-identical to hf/)
  data/             synthetic Video-R1-style dataset: videos/, images/, train.json, test.json
  sample.pt         model inputs of one video + question (torch.load it: input_ids, pixel_values_videos, ...)
  generation.json   the greedy response of step 5 (token_ids, text, finish_reason, prompt_length)
  attention.pt      last-layer attention-policy rows of that response (rows [R, T], prompt_length, input_ids)
EOF
