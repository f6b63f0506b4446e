"""ElaLoRA itself, independent of any model: the layer, its starts, importance scores, the allocator, the resizer, the byte budget and the method's settings."""
