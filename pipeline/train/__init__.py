"""Training: the loop and its checkpoints."""
