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
# 3. model     tiny random LLaVA/CLIP/DINOv2 (model/presets.py)
# 4. pretrain  single-round LLM-Seg on the pictures' single queries (the built-in demo's recipe,
#              DEMO_JOBS processes), as SegLLM starts from a trained segmentation model
# 5. train     from those weights, on the conversations (training.py, multi_round family):
#              SegLLM (--mask_encoder pooled: earlier masks re-encoded) and, beside it, the
#              baseline (DEMO_BASELINE=1, the default): the same model with the references
#              removed (single-round LLM-Seg reading "object 1" in words)
# 6. evaluate  eval.py on the held-out conversations with --history gt, predicted and none (and
#              the baseline without history)
# 7. report    OUT_DIR/metrics.json per round and history, referring rounds, chance and oracle,
#              per relation; OUT_DIR/vis/ one strip per conversation
# 8. export    the trained SegLLM model as OUT_DIR/export, for chat.py --multi_round and the web
#              demo: python app.py --model_dir OUT_DIR/export
#
# Sizes come from the environment (DEMO_NUM_TRAIN, DEMO_EPOCHS, ...; see below); the test suite runs
# a small variant. DEMO_PRETRAIN_EPOCHS=0 trains both models from scratch on the conversations.
# The numbers are deterministic for a seed and DEMO_JOBS. A rerun starts over.
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
JOBS="${DEMO_JOBS:-2}"                 # processes at once (proposal shards, pretraining ranks)
# stage 4, single-round pretraining: PRETRAIN_EPOCHS x PRETRAIN_STEPS steps of BATCH_SIZE
# pictures, QUERIES_PER_IMAGE queries each (the picture's own and EXTRA_QUERIES further ones)
PRETRAIN_EPOCHS="${DEMO_PRETRAIN_EPOCHS:-7}"
PRETRAIN_STEPS="${DEMO_PRETRAIN_STEPS_PER_EPOCH:-275}"
EXTRA_QUERIES="${DEMO_EXTRA_QUERIES:-3}"
QUERIES_PER_IMAGE="${DEMO_QUERIES_PER_IMAGE:-4}"
# stage 5, conversations: EPOCHS x STEPS_PER_EPOCH steps of BATCH_SIZE / CONVERSATIONS_PER_SAMPLE
# pictures, each with up to CONVERSATIONS_PER_SAMPLE of its conversations (which share the
# picture-side work): BATCH_SIZE conversations for pictures with that many (all but the 4% the
# generator gave no further conversation; with SINGLE_ROUND_RATE, a single-round sample is a
# picture with QUERIES_PER_IMAGE queries)
EPOCHS="${DEMO_EPOCHS:-5}"
STEPS_PER_EPOCH="${DEMO_STEPS_PER_EPOCH:-400}"
BATCH_SIZE="${DEMO_BATCH_SIZE:-8}"
CONVERSATIONS_PER_SAMPLE="${DEMO_CONVERSATIONS_PER_SAMPLE:-4}"
MAX_ROUNDS="${DEMO_MAX_ROUNDS:-5}"
LR="${DEMO_LR:-2e-3}"
WARMUP_STEPS="${DEMO_WARMUP_STEPS:-50}"
TOP_K="${DEMO_TOP_K:-50}"
# hidden width of the scorer's embedding head, which runs on every proposal of every round
# (upstream's 2048; the demo's scorer is 64 wide)
EMBEDDING_HIDDEN="${DEMO_SCORER_EMBEDDING_HIDDEN:-256}"
BASELINE="${DEMO_BASELINE:-1}"
EXTRA_CONVERSATIONS="${DEMO_EXTRA_CONVERSATIONS:-3}"  # further conversations per training picture
REF_DROPOUT="${DEMO_REF_DROPOUT:-0.5}"
# single-round ReasonSeg steps mixed into stage 5 (weight against the conversations' 1; 0: none)
SINGLE_ROUND_RATE="${DEMO_SINGLE_ROUND_RATE:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false

if ! [[ "$JOBS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: DEMO_JOBS must be a positive whole number, got '$JOBS': DEMO_JOBS" >&2
  exit 2
fi
if ((PRETRAIN_EPOCHS > 0 && BATCH_SIZE % JOBS != 0)); then
  echo "error: DEMO_BATCH_SIZE ($BATCH_SIZE) must be a multiple of DEMO_JOBS ($JOBS): DEMO_BATCH_SIZE" >&2
  exit 2
fi
if ! [[ "$CONVERSATIONS_PER_SAMPLE" =~ ^[1-9][0-9]*$ ]] ||
  ((BATCH_SIZE % CONVERSATIONS_PER_SAMPLE != 0)); then
  echo "error: DEMO_CONVERSATIONS_PER_SAMPLE must divide DEMO_BATCH_SIZE ($BATCH_SIZE), got \
'$CONVERSATIONS_PER_SAMPLE': DEMO_CONVERSATIONS_PER_SAMPLE" >&2
  exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$REPO"

DATASET="$OUT/dataset"
MASKS="$OUT/sam_masks"
NUM_STAGES=8
# shellcheck source=scripts/lib/demo_stages.sh
source "$REPO/scripts/lib/demo_stages.sh"

rm -rf "$DATASET" "$MASKS" "$OUT/checkpoints" "$OUT/pretrain" "$OUT/train" "$OUT/train_baseline" \
  "$OUT"/eval_{gt,predicted,none,baseline} "$OUT"/{train_baseline,eval_none,eval_baseline}.log \
  "$OUT/vis" "$OUT/metrics.json" "$OUT/export"

stage 1 generate "synthetic conversations: $NUM_TRAIN train / $NUM_VAL val pictures of ${IMAGE_SIZE}px"
"$PYTHON" -m prepare_datasets.prepare_synthetic --out_dir "$DATASET" --seed "$SEED" \
  --num_train "$NUM_TRAIN" --num_val "$NUM_VAL" --num_test 0 --image_size "$IMAGE_SIZE" \
  --conversations --extra_conversations "$EXTRA_CONVERSATIONS" --extra_queries "$EXTRA_QUERIES"
stage_done

stage 2 proposals "weight-free mask proposals ($JOBS processes; progress of the first shown)"
weightfree_proposals "$DATASET" "$MASKS" "$JOBS"
stage_done

stage 3 model "tiny random checkpoints"
"$PYTHON" -m model.presets --dataset_dir "$DATASET" --out_dir "$OUT/checkpoints" --seed "$SEED"
mapfile -t MODEL_ARGS <"$OUT/checkpoints/model_args.txt"
MODEL_ARGS+=(--scorer_embedding_hidden_dim "$EMBEDDING_HIDDEN")
SEGLLM_ARGS=("${MODEL_ARGS[@]}" --mask_encoder pooled)
stage_done

DATA_ARGS=(--dataset_dir "$DATASET" --sam_masks_dir "$MASKS" --val_dataset "ReasonSegMR|val"
  --top_k_proposals "$TOP_K" --selection argmax --device cpu)
COMMON_ARGS=(--grad_accumulation_steps 1 --lr "$LR" --warmup_steps "$WARMUP_STEPS" --workers 1
  --seed "$SEED" --print_freq 25 --log_base_dir "$OUT")

INIT_ARGS=()
if ((PRETRAIN_EPOCHS > 0)); then
  stage 4 pretrain "single-round LLM-Seg: $PRETRAIN_EPOCHS epochs x $PRETRAIN_STEPS steps of \
$BATCH_SIZE pictures x $QUERIES_PER_IMAGE queries ($JOBS processes)"
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$JOBS" training.py \
    "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${COMMON_ARGS[@]}" --dataset reason_seg \
    --sample_rates 1 --reason_seg_data "ReasonSeg|train" \
    --num_classes_per_sample "$QUERIES_PER_IMAGE" --epochs "$PRETRAIN_EPOCHS" \
    --steps_per_epoch "$PRETRAIN_STEPS" --batch_size "$((BATCH_SIZE / JOBS))" --no-eval \
    --exp_name pretrain
  INIT_ARGS=(--init_weights "$OUT/pretrain")
  stage_done
fi

FAMILIES=(--dataset multi_round --sample_rates 1)
if awk "BEGIN { exit !($SINGLE_ROUND_RATE > 0) }"; then
  FAMILIES=(--dataset "multi_round||reason_seg" --sample_rates "1,$SINGLE_ROUND_RATE"
    --reason_seg_data "ReasonSeg|train" --num_classes_per_sample "$QUERIES_PER_IMAGE")
fi
TRAIN_ARGS=("${DATA_ARGS[@]}" "${COMMON_ARGS[@]}" "${INIT_ARGS[@]}" "${FAMILIES[@]}"
  --multi_round_data "ReasonSeg|train" --max_rounds "$MAX_ROUNDS" --epochs "$EPOCHS"
  --steps_per_epoch "$STEPS_PER_EPOCH" --conversations_per_sample "$CONVERSATIONS_PER_SAMPLE"
  --batch_size "$((BATCH_SIZE / CONVERSATIONS_PER_SAMPLE))")

BESIDE_NOTE=""
if [[ "$BASELINE" == 1 ]]; then
  BESIDE_NOTE=", the baseline beside it (log: $OUT/train_baseline.log)"
fi
stage 5 train "SegLLM on the conversations: $EPOCHS epochs x $STEPS_PER_EPOCH steps of \
$BATCH_SIZE$BESIDE_NOTE"
if [[ "$BASELINE" == 1 ]]; then
  beside "$OUT/train_baseline.log" "$PYTHON" training.py "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" \
    --history none --no-eval --exp_name train_baseline
fi
"$PYTHON" training.py "${SEGLLM_ARGS[@]}" --ref_dropout "$REF_DROPOUT" "${TRAIN_ARGS[@]}" \
  --no-eval --exp_name train
wait_beside
stage_done

evaluate() {  # evaluate RUN HISTORY NAME [MODEL FLAGS...]: OUT/RUN's last save -> OUT/eval_NAME
  local run=$1 history=$2 name=$3
  shift 3
  "$PYTHON" eval.py "$@" "${DATA_ARGS[@]}" --checkpoint "$OUT/$run" --checkpoint_tag latest \
    --history "$history" --out_dir "$OUT/eval_$name"
}

stage 6 evaluate "eval.py with --history gt, predicted and none ($JOBS at a time)"
beside "$OUT/eval_none.log" evaluate train none none "${SEGLLM_ARGS[@]}" --visualize
evaluate train predicted predicted "${SEGLLM_ARGS[@]}" --visualize
BASELINE_ARGS=()
if [[ "$BASELINE" == 1 ]]; then
  beside "$OUT/eval_baseline.log" evaluate train_baseline none baseline "${MODEL_ARGS[@]}"
  BASELINE_ARGS=(--baseline_dir "$OUT/eval_baseline")
fi
evaluate train gt gt "${SEGLLM_ARGS[@]}" --visualize
wait_beside
EVAL_DIRS="gt=$OUT/eval_gt,predicted=$OUT/eval_predicted,none=$OUT/eval_none"
stage_done

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
