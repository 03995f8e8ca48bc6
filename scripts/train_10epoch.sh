#!/usr/bin/env bash
# LLM-Seg, upstream's main recipe: 2 GPUs, sem_seg||refer_seg||reason_seg sampled 9:3:1, lr 1e-4,
# 10 epochs x 500 optimizer steps, each step 1 image x 10 accumulation x 2 GPUs (5000 steps).
# Validates on ReasonSeg val after every epoch; keeps the last and the best checkpoint in
# $LOG_DIR/$EXP_NAME/ckpt_model. Rerunning the same command resumes from the last save.
#
# Every path below can be overridden from the environment, e.g.
#   DATASET_DIR=/data/lisa GPUS=localhost:2,3 bash scripts/train_10epoch.sh
# and extra flags go to training.py:  bash scripts/train_10epoch.sh --workers 4
set -euo pipefail

LLAVA_PATH="${LLAVA_PATH:-./pretrained/LLaVA-Lightning-7B-v1}"
VISION_TOWER="${VISION_TOWER:-./pretrained/clip-vit-large-patch14}"
DINOV2_PATH="${DINOV2_PATH:-./pretrained/dinov2-large}"
DATASET_DIR="${DATASET_DIR:-./dataset}"
SAM_MASKS_DIR="${SAM_MASKS_DIR:-./dataset/sam_masks}"
LOG_DIR="${LOG_DIR:-./runs}"
EXP_NAME="${EXP_NAME:-10epoch}"
GPUS="${GPUS:-localhost:0,1}"
MASTER_PORT="${MASTER_PORT:-24374}"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

deepspeed --include "$GPUS" --master_port "$MASTER_PORT" "$REPO/training.py" \
  --version "$LLAVA_PATH" \
  --vision-tower "$VISION_TOWER" \
  --dinov2 "$DINOV2_PATH" \
  --dataset_dir "$DATASET_DIR" \
  --sam_masks_dir "$SAM_MASKS_DIR" \
  --dataset "sem_seg||refer_seg||reason_seg" \
  --sample_rates "9,3,1" \
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
