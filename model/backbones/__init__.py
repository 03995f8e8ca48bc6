"""The pretrained parts LLM-Seg reads with: LLaVA (LLaMA + CLIP + projector) and its checkpoint
layouts, the frozen DINOv2 feature grid, and SAM at any size."""
