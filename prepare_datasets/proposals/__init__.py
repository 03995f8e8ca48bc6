"""The proposal engine: SAM "segment everything" (fast generator, batched decoder, mask
post-processing), the weight-free demo backend, and the resumable, sharded runner every
``prepare_<dataset>.py`` drives."""
