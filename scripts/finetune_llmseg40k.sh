#!/usr/bin/env bash
# Fine-tune a trained LLM-Seg run on LLM-Seg40K (upstream's finetune_llmseg.sh recipe): 2 GPUs,
# lr 1e-5, 5 epochs x 500 optimizer steps of 1 image x 10 accumulation x 2 GPUs. Starts from the
# trainable weights of $PRETRAINED_RUN (best save; optimizer, schedule and step start fresh, as
# upstream) and validates on LLM-Seg40K validation after every epoch. Rerunning the same command
# resumes the fine-tuning run itself.
#
# Every path below can be overridden from the environment, e.g.
#   PRETRAINED_RUN=runs/20epoch GPUS=localhost:2,3 bash scripts/finetune_llmseg40k.sh
# and extra flags go to training.py:  bash scripts/finetune_llmseg40k.sh --workers 4
set -euo pipefail

LLAVA_PATH="${LLAVA_PATH:-./pretrained/LLaVA-Lightning-7B-v1}"
VISION_TOWER="${VISION_TOWER:-./pretrained/clip-vit-large-patch14}"
DINOV2_PATH="${DINOV2_PATH:-./pretrained/dinov2-large}"
DATASET_DIR="${DATASET_DIR:-./dataset}"
SAM_MASKS_DIR="${SAM_MASKS_DIR:-./dataset/sam_masks}"
LOG_DIR="${LOG_DIR:-./runs}"
PRETRAINED_RUN="${PRETRAINED_RUN:-./runs/10epoch}"
EXP_NAME="${EXP_NAME:-finetune_llmseg40k}"
GPUS="${GPUS:-localhost:0,1}"
MASTER_PORT="${MASTER_PORT:-24375}"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

deepspeed --include "$GPUS" --master_port "$MASTER_PORT" "$REPO/training.py" \
  --version "$LLAVA_PATH" \
  --vision-tower "$VISION_TOWER" \
  --dinov2 "$DINOV2_PATH" \
  --dataset_dir "$DATASET_DIR" \
  --sam_masks_dir "$SAM_MASKS_DIR" \
  --dataset "llmseg40k" \
  --sample_rates "1" \
  --llmseg40k_data "LLMSeg40K|train" \
  --val_dataset "LLMSeg40K|validation" \
  --init_weights "$PRETRAINED_RUN" \
  --exp_name "$EXP_NAME" \
  --log_base_dir "$LOG_DIR" \
  --lr 1e-5 \
  --epochs 5 \
  --steps_per_epoch 500 \
  --batch_size 1 \
  --grad_accumulation_steps 10 \
  --precision bf16 \
  "$@"
