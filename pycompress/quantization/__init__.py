"""Quantization: ``quantize`` converts layers to int8 kernels (w8a8, w8a16): linear layers to ``Int8Linear``,
2-D convolutions to ``Int8Conv2d`` (``fuse``: BatchNorm folding, activation fusion, uint8 chains; ``observers``:
calibration ranges)."""
