"""Benchmark: per-token int8 quantization (pycompress vs an eager PyTorch reference)."""

from __future__ import annotations

import torch

import pycompress.ops as ops
from common import time_fn

KERNEL = "quant"


def _torch_quantize(x):
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127.0
    return torch.round(xf / s).clamp(-127, 127).to(torch.int8), s.squeeze(-1)


def run(device: str, quick: bool = False) -> list[dict]:
    shapes = [(1, 4096), (128, 4096), (2048, 4096)] if quick else [
        (1, 4096), (16, 4096), (128, 4096), (2048, 4096), (4096, 8192)]
    dtypes = [torch.float32, torch.bfloat16]
    rows = []
    for dtype in dtypes:
        for M, K in shapes:
            x = torch.randn(M, K, device=device).to(dtype)
            moved = x.numel() * (x.element_size() + 1) + M * 4  # read x, write q and scales
            for impl, fn in [("torch eager", lambda: _torch_quantize(x)),
                             ("pycompress", lambda: ops.quantize_per_token(x))]:
                t = time_fn(fn, device, warmup=2, repeats=5 if quick else 20)
                rows.append({
                    "kernel": KERNEL, "case": f"M={M} K={K} {str(dtype)[6:]}", "impl": impl,
                    "M": M, "K": K, "dtype": str(dtype)[6:], **t,
                    "GB/s": moved / (t["ms"] * 1e-3) / 1e9,
                })
    return rows
