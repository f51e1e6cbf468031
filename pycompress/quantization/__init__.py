"""Quantization: ``quantize`` converts layers to int8 kernels (w8a8, w8a16)."""
