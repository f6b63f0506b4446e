"""Reading, splitting, tokenising and batching the task data: records (files, built-in sets) -> chat (templates) -> batches."""
