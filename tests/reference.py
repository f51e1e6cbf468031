"""Pure-PyTorch references the kernels are tested against."""

from __future__ import annotations

import torch


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``pycompress.ops.quantize_per_token`` (same fp32 arithmetic, bit-exact)."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    finite = torch.isfinite(xf).all(dim=-1)
    ok = finite & (absmax > 0)
    safe = torch.where(ok, absmax, torch.ones_like(absmax))
    inv = torch.where(ok, torch.full_like(absmax, 127.0) / safe, torch.zeros_like(absmax))
    q = torch.round(xf * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    q = torch.where(ok.unsqueeze(-1), q, torch.zeros_like(q))
    scale = torch.where(ok, absmax / 127.0, torch.ones_like(absmax))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q, scale
