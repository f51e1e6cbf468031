"""Pure-PyTorch references the kernels are tested against."""

from __future__ import annotations

import torch


def quantize_per_token_ref(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``pycompress.ops.quantize_per_token`` (same fp32 arithmetic, bit-exact).

    ``qmax`` replaces 127 (63: the 7-bit activations of ``int8_linear(..., act_bits=7)``).
    """
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    finite = torch.isfinite(xf).all(dim=-1)
    ok = finite & (absmax > 0)
    safe = torch.where(ok, absmax, torch.ones_like(absmax))
    inv = torch.where(ok, torch.full_like(absmax, float(qmax)) / safe, torch.zeros_like(absmax))
    # rows with absmax < qmax / FLT_MAX (qmax / absmax overflows): x and absmax scaled by 2^64
    tiny = torch.isinf(inv)
    inv = torch.where(tiny, float(qmax) / (safe * 2.0 ** 64), inv)
    xf = torch.where(tiny.unsqueeze(-1), xf * 2.0 ** 64, xf)
    q = torch.round(xf * inv.unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8)
    q = torch.where(ok.unsqueeze(-1), q, torch.zeros_like(q))
    scale = torch.where(ok, absmax / float(qmax), torch.ones_like(absmax))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q, scale


def linear_ref(x, w, w_scale, bias, act_bits=8):
    """W8A8 reference: same quantization and the same fp32 epilogue order as the kernels."""
    q, s = quantize_per_token_ref(x.cpu(), qmax=127 if act_bits == 8 else 63)
    acc = (q.long() @ w.cpu().long().t()).float()
    y = (acc * s[:, None]) * w_scale.cpu()[None, :]
    if bias is not None:
        y = y + bias.cpu().float()[None, :]
    return y.to(x.dtype)
