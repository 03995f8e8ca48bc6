#!/usr/bin/env bash
# Evaluate a trained LLM-Seg run on ReasonSeg val and test (test with its short/long breakdown):
# one device, no launcher. Writes $OUT_DIR/<split>/metrics.json (gIoU, cIoU, ncIoU, per group)
# and per_image.csv; add --visualize for an overlay per image.
#
# Every path below can be overridden from the environment, e.g.
#   CHECKPOINT=runs/20epoch SPLITS="test" bash scripts/eval_reasonseg.sh --visualize
# LLM-Seg40K or refCOCO work the same way:
#   DATASET="LLMSeg40K" SPLITS="validation test" bash scripts/eval_reasonseg.sh
set -euo pipefail

LLAVA_PATH="${LLAVA_PATH:-./pretrained/LLaVA-Lightning-7B-v1}"
VISION_TOWER="${VISION_TOWER:-./pretrained/clip-vit-large-patch14}"
DINOV2_PATH="${DINOV2_PATH:-./pretrained/dinov2-large}"
DATASET_DIR="${DATASET_DIR:-./dataset}"
SAM_MASKS_DIR="${SAM_MASKS_DIR:-./dataset/sam_masks}"
CHECKPOINT="${CHECKPOINT:-./runs/10epoch}"
OUT_DIR="${OUT_DIR:-./eval_out/reasonseg}"
DATASET="${DATASET:-ReasonSeg}"
SPLITS="${SPLITS:-val test}"
SELECTION="${SELECTION:-iop}"
PYTHON="${PYTHON:-python}"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

for split in $SPLITS; do
  "$PYTHON" "$REPO/eval.py" \
    --version "$LLAVA_PATH" \
    --vision-tower "$VISION_TOWER" \
    --dinov2 "$DINOV2_PATH" \
    --checkpoint "$CHECKPOINT" \
    --checkpoint_tag best \
    --dataset_dir "$DATASET_DIR" \
    --sam_masks_dir "$SAM_MASKS_DIR" \
    --val_dataset "$DATASET|$split" \
    --selection "$SELECTION" \
    --iop_threshold 0.5 \
    --precision bf16 \
    --out_dir "$OUT_DIR/$split" \
    "$@"
done
