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


def conv2d_quantize_ref(x, x_scale=None, x_zero_point=None):
    """The per-image input quantization of ``int8_conv2d``: ``(q int64 NCHW, scale [N], zp [N])``."""
    n = x.shape[0]
    if x.dtype in (torch.uint8, torch.int8):
        return x.cpu().long(), x_scale.cpu().float().expand(n), x_zero_point.cpu().long().expand(n)
    xf = x.cpu().float()
    if x_scale is None:
        flat = xf.reshape(n, -1)
        lo = torch.clamp(flat.amin(dim=1), max=0.0) if flat.shape[1] else torch.zeros(n)
        hi = torch.clamp(flat.amax(dim=1), min=0.0) if flat.shape[1] else torch.zeros(n)
        scale = (hi - lo) / 255.0
        scale = torch.where((hi == lo) | (scale == 0), torch.ones_like(scale), scale)
        zp = torch.round(-lo / scale).clamp(0, 255)
        q = torch.round(xf / scale[:, None, None, None]) + zp[:, None, None, None]
        return q.clamp(0, 255).long(), scale, zp.long()
    scale = x_scale.cpu().float().expand(n)
    zp = x_zero_point.cpu().long().expand(n)
    inv = 1.0 / scale  # fp32
    q = torch.round(xf * inv[:, None, None, None]) + zp[:, None, None, None].float()
    return q.clamp(0, 255).long(), scale, zp


def conv2d_ref(x, w, w_scale, bias=None, *, x_scale=None, x_zero_point=None, stride=1, padding=0,
               dilation=1, groups=1, activation="none", out_dtype=None, out_scale=1.0, out_zero_point=0,
               residual=None, residual_scale=1.0, residual_zero_point=0):
    """Reference for ``int8_conv2d``: exact integer accumulator (float64 conv of values that are
    exact in float64) and the same fp32 epilogue order as the kernels; a residual is added after
    the bias (uint8 / int8: ``(float)(q - zp) * scale``, one rounded step each)."""
    import torch.nn.functional as F

    q, s, z = conv2d_quantize_ref(x, x_scale, x_zero_point)
    a = (q - z[:, None, None, None]).double()
    acc = F.conv2d(a, w.cpu().double(), None, stride, padding, dilation, groups)
    acc = acc.round().long()
    assert acc.abs().max().item() < 2 ** 31 if acc.numel() else True
    y = (acc.float() * s[:, None, None, None]) * w_scale.cpu().float()[None, :, None, None]
    if bias is not None:
        y = y + bias.cpu().float()[None, :, None, None]
    if residual is not None:
        r = residual.cpu()
        if r.dtype in (torch.uint8, torch.int8):
            r = (r.to(torch.int32) - residual_zero_point).to(torch.float32) * torch.tensor(residual_scale,
                                                                                         dtype=torch.float32)
        y = y + r.to(torch.float32)
    if activation == "relu":
        y = torch.clamp_min(y, 0.0)
    elif activation == "relu6":
        y = torch.clamp(y, 0.0, 6.0)
    elif activation == "silu":
        y = y / (1.0 + torch.exp(-y))
    elif activation == "hardswish":
        y = y * torch.clamp(y + 3.0, 0.0, 6.0) / 6.0
    if out_dtype is None:
        out_dtype = torch.float32 if x.dtype in (torch.uint8, torch.int8) else x.dtype
    if out_dtype in (torch.uint8, torch.int8):
        inv = 1.0 / torch.tensor(float(out_scale), dtype=torch.float32)
        lo, hi = (0, 255) if out_dtype == torch.uint8 else (-128, 127)
        r = (torch.round(y * inv) + float(out_zero_point)).clamp(lo, hi)
        return r.to(out_dtype)
    return y.to(out_dtype)
