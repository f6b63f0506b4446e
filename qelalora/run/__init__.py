"""One training job: recipe, data, the loop, checkpoints, the run folder's outputs (adapters, reports) and its lock."""
