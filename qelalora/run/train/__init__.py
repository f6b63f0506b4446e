"""Training: the model built from a recipe, one step, the loop, its checkpoints and processes."""
