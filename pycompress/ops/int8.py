"""Int8 ops: per-token quantization (and the int8 GEMM family).

Thin validated wrappers over ``torch.ops.pycompress.*`` plus their fake (meta)
kernels, so that ``torch.compile`` and ``torch.export`` can trace them.
"""

from __future__ import annotations

import torch

from pycompress import _ext  # noqa: F401  (loads the kernels)
from pycompress.ops._validation import FLOAT_DTYPES, check_device_supported, check_tensor

__all__ = ["quantize_per_token"]


@torch.library.register_fake("pycompress::quantize_per_token")
def _quantize_per_token_fake(x):
    torch._check(x.dim() == 2, lambda: "quantize_per_token: x must be 2-D")
    M, K = x.shape
    return x.new_empty((M, K), dtype=torch.int8), x.new_empty((M,), dtype=torch.float32)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token (per-row) int8 quantization.

    For every row of ``x`` (the last dimension is the row), ``scale = absmax / 127`` and
    ``q = clamp(round_half_even(x * (127 / absmax)), -127, 127)``, computed in fp32. Rows of
    zeros get ``scale = 1`` and ``q = 0``; rows holding NaN or ±inf get ``scale = NaN`` and
    ``q = 0`` so the problem stays visible after dequantization.

    Args:
        x: float32, float16 or bfloat16 tensor of shape ``[..., K]`` (at least 2-D; leading
            dimensions are rows). Non-contiguous rows are copied first.

    Returns:
        ``(q, scale)``: ``q`` int8 with the shape of ``x``; ``scale`` float32 of shape ``x.shape[:-1]``.
        ``q * scale[..., None]`` approximates ``x``.

    Example:
        >>> import torch, pycompress.ops as ops
        >>> q, s = ops.quantize_per_token(torch.tensor([[1.0, -2.0, 0.5]]))
        >>> q.tolist(), s.tolist()
        ([[64, -127, 32]], [0.015748031437397003])
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=2)
    check_device_supported(x.device, "quantize_per_token")
    if x.dim() == 2:
        return torch.ops.pycompress.quantize_per_token(x)
    lead = x.shape[:-1]
    q, s = torch.ops.pycompress.quantize_per_token(x.reshape(-1, x.shape[-1]))
    return q.reshape(x.shape), s.reshape(lead)
