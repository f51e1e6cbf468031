"""Export: ``save`` / ``load`` (safetensors + manifest) and ``export_onnx`` (standard int8 ONNX)."""
