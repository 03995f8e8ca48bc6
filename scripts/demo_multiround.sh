#!/usr/bin/env bash
# The built-in multi-round demo (SegLLM in miniature): conversations whose later rounds can only be
# answered through the mask of an earlier round, on a laptop CPU, nothing downloaded.
#
#   bash scripts/demo_multiround.sh OUT_DIR
#
# 1. generate  synthetic scenes with 2-5-round conversations (prepare_synthetic.py
#              --conversations): a later round names an earlier object ("the object directly left
#              of object 1 [REF:1]") with a relation whose answer is unique only given that object
# 2. proposals weight-free "segment everything" proposals (the real prepare pipeline)
# 3. model     tiny random LLaVA/CLIP/DINOv2 (model/presets.py) + SegLLM's parts (--mask_encoder)
# 4. train     training.py, multi_round family (DeepSpeed on the CPU)
# 5. evaluate  eval.py on the held-out conversations with --history gt, predicted and none
# 6. baseline  (DEMO_BASELINE=1, the default) the same tiny model trained on the same conversations
#              with the references removed (single-round LLM-Seg reading "object 1" in words)
# 7. report    OUT_DIR/metrics.json per round and history, referring rounds, chance and oracle,
#              per relation; OUT_DIR/vis/ one strip per conversation
# 8. export    the trained SegLLM model as OUT_DIR/export, for chat.py --multi_round and the web
#              demo: python app.py --model_dir OUT_DIR/export
#
# Sizes come from the environment (DEMO_NUM_TRAIN, DEMO_EPOCHS, ...; see below); the test suite runs
# a small variant. A rerun starts over.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: bash scripts/demo_multiround.sh OUT_DIR" >&2
  exit 2
fi

PYTHON="${PYTHON:-python}"
SEED="${DEMO_SEED:-0}"
NUM_TRAIN="${DEMO_NUM_TRAIN:-1200}"
NUM_VAL="${DEMO_NUM_VAL:-100}"
IMAGE_SIZE="${DEMO_IMAGE_SIZE:-128}"
JOBS="${DEMO_JOBS:-2}"
EPOCHS="${DEMO_EPOCHS:-3}"
STEPS_PER_EPOCH="${DEMO_STEPS_PER_EPOCH:-250}"
BATCH_SIZE="${DEMO_BATCH_SIZE:-8}"
MAX_ROUNDS="${DEMO_MAX_ROUNDS:-5}"
LR="${DEMO_LR:-2e-3}"
WARMUP_STEPS="${DEMO_WARMUP_STEPS:-50}"
TOP_K="${DEMO_TOP_K:-50}"
BASELINE="${DEMO_BASELINE:-1}"
EXTRA_CONVERSATIONS="${DEMO_EXTRA_CONVERSATIONS:-0}"  # further conversations per training picture
REF_DROPOUT="${DEMO_REF_DROPOUT:-0.5}"
# single-round ReasonSeg steps mixed in (weight against the conversations' 1; 0: none), each
# asking 1 + EXTRA_QUERIES queries about one picture, as the single-round demo trains
SINGLE_ROUND_RATE="${DEMO_SINGLE_ROUND_RATE:-0}"
EXTRA_QUERIES="${DEMO_EXTRA_QUERIES:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$REPO"

DATASET="$OUT/dataset"
MASKS="$OUT/sam_masks"
NUM_STAGES=8
# shellcheck source=scripts/lib/demo_stages.sh
source "$REPO/scripts/lib/demo_stages.sh"

rm -rf "$DATASET" "$MASKS" "$OUT/checkpoints" "$OUT/train" "$OUT/train_baseline" "$OUT"/eval_* \
  "$OUT/vis" "$OUT/metrics.json" "$OUT/export"

stage 1 generate "synthetic conversations: $NUM_TRAIN train / $NUM_VAL val pictures of ${IMAGE_SIZE}px"
"$PYTHON" -m prepare_datasets.prepare_synthetic --out_dir "$DATASET" --seed "$SEED" \
  --num_train "$NUM_TRAIN" --num_val "$NUM_VAL" --num_test 0 --image_size "$IMAGE_SIZE" \
  --conversations --extra_conversations "$EXTRA_CONVERSATIONS" --extra_queries "$EXTRA_QUERIES"
stage_done

stage 2 proposals "weight-free mask proposals ($JOBS processes; progress of the first shown)"
weightfree_proposals "$DATASET" "$MASKS" "$JOBS"
stage_done

stage 3 model "tiny random checkpoints with SegLLM's parts"
"$PYTHON" -m model.presets --dataset_dir "$DATASET" --out_dir "$OUT/checkpoints" --seed "$SEED"
mapfile -t MODEL_ARGS <"$OUT/checkpoints/model_args.txt"
stage_done

DATA_ARGS=(--dataset_dir "$DATASET" --sam_masks_dir "$MASKS" --val_dataset "ReasonSegMR|val"
  --top_k_proposals "$TOP_K" --selection argmax --device cpu)
FAMILIES=(--dataset multi_round --sample_rates 1)
if awk "BEGIN { exit !($SINGLE_ROUND_RATE > 0) }"; then
  FAMILIES=(--dataset "multi_round||reason_seg" --sample_rates "1,$SINGLE_ROUND_RATE"
    --reason_seg_data "ReasonSeg|train" --num_classes_per_sample "$((EXTRA_QUERIES + 1))")
fi
TRAIN_ARGS=("${FAMILIES[@]}" --multi_round_data "ReasonSeg|train"
  --max_rounds "$MAX_ROUNDS" --epochs "$EPOCHS" --steps_per_epoch "$STEPS_PER_EPOCH"
  --batch_size "$BATCH_SIZE" --grad_accumulation_steps 1 --lr "$LR"
  --warmup_steps "$WARMUP_STEPS" --workers 1 --seed "$SEED" --print_freq 25 --log_base_dir "$OUT")

stage 4 train "training.py (SegLLM): $EPOCHS epochs x $STEPS_PER_EPOCH steps of $BATCH_SIZE conversations"
"$PYTHON" training.py "${MODEL_ARGS[@]}" --mask_encoder pooled --ref_dropout "$REF_DROPOUT" \
  "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" --exp_name train
stage_done

stage 5 evaluate "eval.py with --history gt, predicted and none"
EVAL_DIRS=""
for history in gt predicted none; do
  "$PYTHON" eval.py "${MODEL_ARGS[@]}" --mask_encoder pooled "${DATA_ARGS[@]}" \
    --checkpoint "$OUT/train" --checkpoint_tag latest --history "$history" --visualize \
    --out_dir "$OUT/eval_$history"
  EVAL_DIRS="${EVAL_DIRS:+$EVAL_DIRS,}$history=$OUT/eval_$history"
done
stage_done

BASELINE_ARGS=()
if [[ "$BASELINE" == 1 ]]; then
  stage 6 baseline "the same model trained and evaluated without references"
  "$PYTHON" training.py "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" --history none \
    --no-eval --exp_name train_baseline
  "$PYTHON" eval.py "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" --checkpoint "$OUT/train_baseline" \
    --checkpoint_tag latest --history none --out_dir "$OUT/eval_baseline"
  BASELINE_ARGS=(--baseline_dir "$OUT/eval_baseline")
  stage_done
fi

stage 7 report "per round and history, referring rounds, chance and oracle"
"$PYTHON" -m prepare_datasets.multiround_report --dataset_dir "$DATASET" --sam_masks_dir "$MASKS" \
  --split val --eval_dirs "$EVAL_DIRS" "${BASELINE_ARGS[@]}" --out_dir "$OUT" \
  --top_k_proposals "$TOP_K" --stage_seconds "$STAGES"

stage 8 export "the trained model as an export folder (model/export.py)"
"$PYTHON" -m model.export --checkpoint "$OUT/train" --which latest --out_dir "$OUT/export"
stage_done

echo
echo "metrics:      $OUT/metrics.json"
echo "pictures:     $OUT/vis/  (one strip per conversation; referenced objects outlined)"
echo "web demo:     python app.py --model_dir $OUT/export"
