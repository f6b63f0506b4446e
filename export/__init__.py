"""qelalora.export: turns a trained run into ONNX graphs for ONNX Runtime."""
