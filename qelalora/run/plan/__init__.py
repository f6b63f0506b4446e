"""The memory plan: initial ranks from the budget, and the footprint traced on fake tensors before any weight loads."""
