#!/usr/bin/env bash
# The built-in demo: the whole LLM-Seg pipeline on a laptop CPU, no download, in minutes.
#
#   bash scripts/demo.sh OUT_DIR
#
# 1. generate  a synthetic ReasonSeg-format dataset (prepare_datasets/prepare_synthetic.py)
# 2. proposals "segment everything" proposals with the weight-free backend (the real prepare
#              pipeline; SAM weights are not needed)
# 3. model     tiny random LLaVA/CLIP/DINOv2 with a tokenizer trained on the queries
#              (model/presets.py; its flags go to OUT_DIR/checkpoints/model_args.txt)
# 4. train     training.py (DeepSpeed on the CPU), TensorBoard logs in OUT_DIR/train
# 5. evaluate  eval.py on the held-out val split, an overlay picture per query
# 6. report    OUT_DIR/metrics.json: gIoU/cIoU beside chance (a random proposal) and oracle (the
#              best proposal), per query type; OUT_DIR/vis/*.png
# 7. export    the trained model (the weights evaluated) as OUT_DIR/export (model/export.py), for
#              chat.py and the web demo: python app.py --model_dir OUT_DIR/export
#
# Every training picture comes with further queries about other objects in it, and each step
# asks several of them about one picture (one [SEG] round each): the targets differ only by the
# words, so the model must read them (with the same query phrased three ways instead, the
# [SEG] embedding learnt to ignore the colour word). Selection is argmax (each query has
# exactly one target, so the single best-scoring proposal is the answer). Sizes can be
# overridden from the environment, e.g. the test suite's variant:
#   DEMO_NUM_TRAIN=60 DEMO_NUM_VAL=30 DEMO_EPOCHS=1 DEMO_STEPS_PER_EPOCH=250 DEMO_BATCH_SIZE=4 \
#     DEMO_WARMUP_STEPS=25 bash scripts/demo.sh out
# DEMO_NO_TARGET_QUERIES=F / DEMO_MULTI_TARGET_QUERIES=F: that fraction of the queries asks for
# something absent ("the purple object" when nothing is purple; the model is trained to reject,
# --rejection DEMO_REJECTION, token by default) or for every object sharing a colour or shape
# ("all the circles"; DEMO_SELECTION=hybrid lets one [SEG] select several proposals); the report
# gains N-acc/T-acc and their rows. DEMO_FREE_EVAL=1 also evaluates with eval.py --mode free
# (the model writes its own answers) and reports both modes.
# DEMO_MASK_HEAD=sam|both trains LISA's SAM mask-decoder head (on the kit's tiny random SAM) instead
# of / beside the proposal scorer; DEMO_TRAIN_SAM_ENCODER=1 trains that SAM's encoder too.
# A rerun starts over: the demo's own folders inside OUT_DIR are replaced.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: bash scripts/demo.sh OUT_DIR" >&2
  exit 2
fi

PYTHON="${PYTHON:-python}"
SEED="${DEMO_SEED:-0}"
NUM_TRAIN="${DEMO_NUM_TRAIN:-1500}"
NUM_VAL="${DEMO_NUM_VAL:-100}"
IMAGE_SIZE="${DEMO_IMAGE_SIZE:-128}"
JOBS="${DEMO_JOBS:-2}"                        # parallel proposal processes
EPOCHS="${DEMO_EPOCHS:-4}"
STEPS_PER_EPOCH="${DEMO_STEPS_PER_EPOCH:-275}"
BATCH_SIZE="${DEMO_BATCH_SIZE:-8}"            # images per optimizer step
EXTRA_QUERIES="${DEMO_EXTRA_QUERIES:-3}"      # further queries per training picture
QUERIES_PER_IMAGE="${DEMO_QUERIES_PER_IMAGE:-4}"  # rounds per picture per step, each another query
LR="${DEMO_LR:-2e-3}"
WARMUP_STEPS="${DEMO_WARMUP_STEPS:-50}"
TOP_K="${DEMO_TOP_K:-50}"                     # proposals the model chooses from
MASK_HEAD="${DEMO_MASK_HEAD:-proposals}"      # proposals (LLM-Seg), sam (LISA) or both
TRAIN_SAM_ENCODER="${DEMO_TRAIN_SAM_ENCODER:-0}"  # 1: the tiny random SAM's encoder trains too
NO_TARGET="${DEMO_NO_TARGET_QUERIES:-0}"       # fraction of queries about something absent
MULTI_TARGET="${DEMO_MULTI_TARGET_QUERIES:-0}"  # fraction asking for every object of a kind
REJECTION="${DEMO_REJECTION:-token}"          # how no-target queries are answered (answer|token)
SELECTION="${DEMO_SELECTION:-argmax}"         # argmax: one proposal per [SEG]; hybrid: + IoP > 0.5
FREE_EVAL="${DEMO_FREE_EVAL:-0}"              # 1: also eval.py --mode free
# Tiny tensors: one thread per process is fastest (extra threads only spin on a busy CPU).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$REPO"

DATASET="$OUT/dataset"
MASKS="$OUT/sam_masks"
NUM_STAGES=7
# shellcheck source=scripts/lib/demo_stages.sh
source "$REPO/scripts/lib/demo_stages.sh"

rm -rf "$DATASET" "$MASKS" "$OUT/checkpoints" "$OUT/train" "$OUT/eval" "$OUT/eval_free" "$OUT/vis" \
  "$OUT/metrics.json" "$OUT/export"

stage 1 generate "synthetic dataset: $NUM_TRAIN train / $NUM_VAL val images of ${IMAGE_SIZE}px"
"$PYTHON" -m prepare_datasets.prepare_synthetic --out_dir "$DATASET" --seed "$SEED" \
  --num_train "$NUM_TRAIN" --num_val "$NUM_VAL" --num_test 0 --image_size "$IMAGE_SIZE" \
  --extra_queries "$EXTRA_QUERIES" --no_target_queries "$NO_TARGET" \
  --multi_target_queries "$MULTI_TARGET"
stage_done

stage 2 proposals "weight-free mask proposals ($JOBS processes; progress of the first shown)"
weightfree_proposals "$DATASET" "$MASKS" "$JOBS"
stage_done

stage 3 model "tiny random checkpoints, tokenizer trained on the training queries"
"$PYTHON" -m model.presets --dataset_dir "$DATASET" --out_dir "$OUT/checkpoints" --seed "$SEED"
mapfile -t MODEL_ARGS <"$OUT/checkpoints/model_args.txt"
if [[ "$MASK_HEAD" != proposals ]]; then
  MODEL_ARGS+=(--mask_head "$MASK_HEAD" --sam_checkpoint "$OUT/checkpoints/sam_tiny.pth")
  if [[ "$TRAIN_SAM_ENCODER" == 1 ]]; then
    MODEL_ARGS+=(--train_sam_encoder)
  fi
fi
if awk "BEGIN { exit !($NO_TARGET > 0) }"; then  # a number, so 0.0 is no no-target data
  MODEL_ARGS+=(--rejection "$REJECTION")
fi
stage_done

DATA_ARGS=(--dataset_dir "$DATASET" --sam_masks_dir "$MASKS" --val_dataset "ReasonSeg|val"
  --top_k_proposals "$TOP_K" --selection "$SELECTION" --device cpu)

stage 4 train "training.py: $EPOCHS epochs x $STEPS_PER_EPOCH steps of $BATCH_SIZE images"
"$PYTHON" training.py "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" \
  --dataset reason_seg --sample_rates 1 --num_classes_per_sample "$QUERIES_PER_IMAGE" \
  --epochs "$EPOCHS" --steps_per_epoch "$STEPS_PER_EPOCH" --batch_size "$BATCH_SIZE" \
  --grad_accumulation_steps 1 --lr "$LR" --warmup_steps "$WARMUP_STEPS" --workers 1 \
  --seed "$SEED" --print_freq 25 --log_base_dir "$OUT" --exp_name train
stage_done

stage 5 evaluate "eval.py on the held-out val split (final weights), with pictures"
"$PYTHON" eval.py "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" \
  --checkpoint "$OUT/train" --checkpoint_tag latest --visualize --out_dir "$OUT/eval"
REPORT_ARGS=()
if [[ "$FREE_EVAL" == 1 ]]; then
  "$PYTHON" eval.py "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" --mode free \
    --checkpoint "$OUT/train" --checkpoint_tag latest --out_dir "$OUT/eval_free"
  REPORT_ARGS=(--free_eval_dir "$OUT/eval_free")
fi
stage_done

stage 6 report "chance and oracle of the proposals, per query type"
"$PYTHON" -m prepare_datasets.demo_report --dataset_dir "$DATASET" --sam_masks_dir "$MASKS" \
  --split val --eval_dir "$OUT/eval" --out_dir "$OUT" --top_k_proposals "$TOP_K" \
  --stage_seconds "$STAGES" "${REPORT_ARGS[@]}"

stage 7 export "the trained model as an export folder (model/export.py)"
"$PYTHON" -m model.export --checkpoint "$OUT/train" --which latest --out_dir "$OUT/export"
stage_done

echo
echo "metrics:      $OUT/metrics.json"
echo "pictures:     $OUT/vis/  (query on top; prediction red | ground truth green)"
echo "tensorboard:  tensorboard --logdir $OUT/train"
echo "web demo:     python app.py --model_dir $OUT/export"
