#!/usr/bin/env bash
# LLM-Seg "zero-shot" (no ReasonSeg training data): 2 GPUs, sem_seg||refer_seg sampled 9:3,
# lr 1e-4, 10 epochs x 500 optimizer steps of 1 image x 10 accumulation x 2 GPUs. Validates on
# ReasonSeg val (never trained on) after every epoch. Rerunning the same command resumes.
#
# Every path below can be overridden from the environment, e.g.
#   DATASET_DIR=/data/lisa GPUS=localhost:2,3 bash scripts/train_zero_shot.sh
# and extra flags go to training.py:  bash scripts/train_zero_shot.sh --workers 4
set -euo pipefail

LLAVA_PATH="${LLAVA_PATH:-./pretrained/LLaVA-Lightning-7B-v1}"
VISION_TOWER="${VISION_TOWER:-./pretrained/clip-vit-large-patch14}"
DINOV2_PATH="${DINOV2_PATH:-./pretrained/dinov2-large}"
DATASET_DIR="${DATASET_DIR:-./dataset}"
SAM_MASKS_DIR="${SAM_MASKS_DIR:-./dataset/sam_masks}"
LOG_DIR="${LOG_DIR:-./runs}"
EXP_NAME="${EXP_NAME:-zeroshot}"
GPUS="${GPUS:-localhost:0,1}"
MASTER_PORT="${MASTER_PORT:-24371}"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

deepspeed --include "$GPUS" --master_port "$MASTER_PORT" "$REPO/training.py" \
  --version "$LLAVA_PATH" \
  --vision-tower "$VISION_TOWER" \
  --dinov2 "$DINOV2_PATH" \
  --dataset_dir "$DATASET_DIR" \
  --sam_masks_dir "$SAM_MASKS_DIR" \
  --dataset "sem_seg||refer_seg" \
  --sample_rates "9,3" \
  --val_dataset "ReasonSeg|val" \
  --exp_name "$EXP_NAME" \
  --log_base_dir "$LOG_DIR" \
  --lr 1e-4 \
  --epochs 10 \
  --steps_per_epoch 500 \
  --batch_size 1 \
  --grad_accumulation_steps 10 \
  --precision bf16 \
  "$@"
