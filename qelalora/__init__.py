"""qelalora: ElaLoRA adapters over a 4-bit NF4 base, under a hard memory budget, exported to ONNX."""

__version__ = "0.1.0"
