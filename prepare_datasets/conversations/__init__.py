"""Building SegLLM-style multi-round conversations from annotated images."""
