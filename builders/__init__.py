"""Builders: checkpoint -> one spec per network -> ONNX -> (TensorRT) -> Triton repository."""
