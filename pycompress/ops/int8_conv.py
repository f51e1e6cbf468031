"""Int8 2-D convolution ops: validated wrappers over ``torch.ops.pycompress.int8_conv2d*`` and
their fake kernels (so that ``torch.compile`` / ``torch.export`` can trace them).

The op contract (shared by the CPU and CUDA kernels): the input is quantized per image (uint8 or
int8 with a zero point, or float quantized inside the op), the weight is int8 ``[Cout, Cin/groups,
kh, kw]`` with one symmetric scale per output channel, the int32 accumulator is exact, and the
epilogue computes ``y = ((float)acc * x_scale[n]) * w_scale[co] + bias[co]`` in fp32, adds an
optional residual of the output's shape (``y + (float)(r_q - r_zp) * r_scale`` for a quantized one,
``y + r`` for a float one), applies the activation and writes float or requantized uint8/int8
output in channels_last memory format.
"""

from __future__ import annotations

import math
import struct

import torch

from pycompress import _ext  # noqa: F401  (loads the kernels)
from pycompress.ops._validation import (
    FLOAT_DTYPES,
    check_device_supported,
    check_same_device,
    check_tensor,
    same_device_fake,
)

__all__ = [
    "INT8_CONV_ACTIVATIONS",
    "int8_conv2d",
    "int8_conv2d_pack_weight",
    "int8_conv2d_packed_bytes",
    "int8_conv2d_output_size",
]

INT8_CONV_ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish")
_QUANT_DTYPES = (torch.uint8, torch.int8)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8)


def _f32(v: float) -> float:
    """``v`` rounded to float32 (inf where it overflows)."""
    v = float(v)
    if not math.isfinite(v) or abs(v) >= 3.4028235677973366e38:
        return v if not math.isfinite(v) else math.copysign(math.inf, v)
    return struct.unpack("f", struct.pack("f", v))[0]


def _round_up(v, m):
    return (v + m - 1) // m * m


def int8_conv2d_packed_bytes(cout: int, cin_per_group: int, kh: int, kw: int, groups: int = 1) -> int:
    """Size in bytes of ``int8_conv2d_pack_weight(w, groups)`` for ``w`` of shape
    ``[cout, cin_per_group, kh, kw]``.

    Depthwise weights (``cin_per_group == 1`` and ``groups == cout``) get the depthwise kernel's
    layout (see ``csrc/int8/cpu/conv.cpp``); every other conv one packed int8 GEMM weight
    (``[cout / groups, kh * kw * cin_per_group]``, see :func:`int8_packed_bytes`) per group.
    """
    if cin_per_group == 1 and groups == cout:
        # two VNNI tap sets, the per-channel sums, int16 tap pairs, int16 taps
        cp, taps = _round_up(cout, 64), kh * kw
        return 2 * 4 * cp * ((kh + 3) // 4) * kw + 4 * cp + 4 * cp * ((kh + 1) // 2) * kw + 2 * taps * cp
    n, k = cout // groups, kh * kw * cin_per_group
    kp, np_ = _round_up(k, 4), _round_up(n, 16)
    return groups * (np_ * kp + 4 * np_ + np_ // 4)


def _pair(name, v, minimum):
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    try:
        v = tuple(v)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if len(v) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} values must be >= {minimum}, got {v}")
    return [int(v[0]), int(v[1])]


def _padding(v) -> list[int]:
    """``[top, bottom, left, right]`` from an int, a pair ``(ph, pw)`` (both sides) or four values
    ``(top, bottom, left, right)``."""
    if isinstance(v, bool):
        raise TypeError(f"padding must be an int, a pair or 4 ints (top, bottom, left, right), got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    try:
        v = tuple(v)
    except TypeError:
        raise TypeError(f"padding must be an int, a pair or 4 ints (top, bottom, left, right), got {v!r}") from None
    if len(v) not in (2, 4) or not all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        raise TypeError(f"padding must be an int, a pair or 4 ints (top, bottom, left, right), got {v!r}")
    if min(v) < 0:
        raise ValueError(f"padding values must be >= 0, got {v}")
    if len(v) == 2:
        return [int(v[0]), int(v[0]), int(v[1]), int(v[1])]
    return [int(e) for e in v]


def _op_padding(p4: list[int]) -> list[int]:
    """The op's padding argument: ``[ph, pw]`` when symmetric, else ``[top, bottom, left, right]``."""
    return [p4[0], p4[2]] if p4[0] == p4[1] and p4[2] == p4[3] else list(p4)


def int8_conv2d_output_size(size, kernel, stride=1, padding=0, dilation=1) -> tuple[int, int]:
    """``(Ho, Wo)`` of a conv over an ``(H, W)`` input; a value < 1 means the kernel does not fit.
    ``padding``: an int, ``(ph, pw)`` (both sides) or ``(top, bottom, left, right)``."""
    s, p, d = _pair("stride", stride, 1), _padding(padding), _pair("dilation", dilation, 1)
    h, w = size
    kh, kw = kernel
    return ((h + p[0] + p[1] - d[0] * (kh - 1) - 1) // s[0] + 1,
            (w + p[2] + p[3] - d[1] * (kw - 1) - 1) // s[1] + 1)


def _check_weight(w, groups):
    check_tensor("w", w, dtypes=(torch.int8,), ndim=4)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if w.numel() == 0:
        raise ValueError(f"w must be non-empty [Cout, Cin/groups, kh, kw], got shape {tuple(w.shape)}")
    if w.shape[0] % groups != 0:
        raise ValueError(f"groups={groups} must divide the output channels (w.shape[0] = {w.shape[0]})")


# --------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("pycompress::int8_conv2d_pack_weight")
def _int8_conv2d_pack_weight_fake(w, groups):
    torch._check(w.dim() == 4, lambda: "int8_conv2d_pack_weight: w must be 4-D")
    cout, cg, kh, kw = w.shape
    return w.new_empty((int8_conv2d_packed_bytes(cout, cg, kh, kw, groups),), dtype=torch.int8)


@torch.library.register_fake("pycompress::int8_conv2d")
def _int8_conv2d_fake(x, x_scale, x_zero_point, w, w_scale, bias, w_packed, stride, padding, dilation,
                      groups, activation, out_dtype, out_scale, out_zero_point, residual=None,
                      residual_scale=1.0, residual_zero_point=0):
    torch._check(x.dim() == 4 and w.dim() == 4, lambda: "int8_conv2d: x and w must be 4-D")
    torch._check(x.shape[1] == w.shape[1] * groups, lambda: "int8_conv2d: channel mismatch")
    same_device_fake("int8_conv2d", x, w, w_scale, bias, residual)
    n, _, h, wd = x.shape
    cout, _, kh, kw = w.shape
    torch._check(len(padding) in (2, 4), lambda: "int8_conv2d: padding must have 2 or 4 values")
    pt, pb, pl, pr = padding if len(padding) == 4 else (padding[0], padding[0], padding[1], padding[1])
    ho = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    torch._check(ho >= 1 and wo >= 1, lambda: "int8_conv2d: the output would be empty")
    if residual is not None:
        torch._check(
            residual.dim() == 4 and tuple(residual.shape) == (n, cout, ho, wo),
            lambda: "int8_conv2d: residual must have the output's shape [N, Cout, Ho, Wo]",
        )
    if out_dtype is None:
        out_dtype = torch.float32 if x.dtype in _QUANT_DTYPES else x.dtype
    return torch.empty((n, cout, ho, wo), dtype=out_dtype, device=x.device, memory_format=torch.channels_last)


# --------------------------------------------------------------------------- wrappers


def int8_conv2d_pack_weight(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Packs an int8 conv weight ``[Cout, Cin/groups, kh, kw]`` once for the CPU kernels.

    The result (flat int8, :func:`int8_conv2d_packed_bytes` bytes) is passed as ``w_packed`` to
    :func:`int8_conv2d` so that the weight is not re-packed on every call. CPU tensors only (the
    CUDA kernel reads ``w`` itself and ignores ``w_packed``).

    Example:
        >>> import torch, pycompress.ops as ops
        >>> w = torch.randint(-127, 128, (32, 16, 3, 3), dtype=torch.int8)
        >>> ops.int8_conv2d_pack_weight(w).numel() == ops.int8_conv2d_packed_bytes(32, 16, 3, 3)
        True
    """
    _check_weight(w, groups)
    if w.device.type not in ("cpu", "meta"):
        raise ValueError(f"int8_conv2d_pack_weight packs weights for the CPU kernels; w is on {w.device}")
    return torch.ops.pycompress.int8_conv2d_pack_weight(w, groups)


def int8_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    x_scale: torch.Tensor | None = None,
    x_zero_point: torch.Tensor | None = None,
    w_packed: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
    out_scale: float = 1.0,
    out_zero_point: int = 0,
    residual: torch.Tensor | None = None,
    residual_scale: float = 1.0,
    residual_zero_point: int = 0,
) -> torch.Tensor:
    """Int8 2-D convolution with a fused epilogue (dequantization, bias, residual, activation,
    requantization).

    ``acc[n, co, oy, ox] = sum (x_q - zp[n]) * w`` is computed exactly in int32 (padding holds the
    zero point), then, per output element, in fp32 with each step rounded (never fused into an
    FMA, so every code path gives the same bits)::

        y = ((float)acc * x_scale[n]) * w_scale[co] + bias[co]
        y = y + r                  # with a residual: r = (float)(r_q - residual_zero_point) * residual_scale
                                   # (uint8 / int8 residual) or r = float(residual) (float residual)
        y = activation(y)

    and the output is ``y`` cast to a float dtype or requantized. A residual block
    ``relu(bn(conv(x)) + identity)`` is one call with ``residual=identity, activation="relu"``.

    Args:
        x: ``[N, Cin, H, W]``, any strides (channels_last memory is the fast layout). Either
            already quantized (uint8 or int8, with ``x_scale`` float32 and ``x_zero_point`` int32 of
            shape ``[1]`` or ``[N]``; real value ``(x_q - zp) * x_scale``), or float32 / float16 /
            bfloat16: without ``x_scale``/``x_zero_point`` quantized per image to asymmetric uint8
            over ``[min(0, min x), max(0, max x)]`` inside the op (``scale = (hi - lo) / 255``,
            ``zp = round(-lo / scale)``, ``q = clamp(round(x / scale) + zp, 0, 255)``); with them,
            ``q = clamp(round(x * (1 / x_scale)) + zp, 0, 255)``.
        w: int8 ``[Cout, Cin / groups, kh, kw]``.
        w_scale: float32 ``[Cout]`` symmetric per-output-channel scales.
        bias: optional float ``[Cout]``.
        w_packed: optional :func:`int8_conv2d_pack_weight` ``(w, groups)`` (CPU; ignored on CUDA).
        stride, dilation: ints or pairs (>= 1).
        padding: zero-point padding (>= 0): an int, a pair ``(ph, pw)`` for both sides, or four
            values ``(top, bottom, left, right)`` (TensorFlow's "SAME" padding of stride-2 convs
            pads one more row and column after the image than before it).
        groups: divides ``Cin`` and ``Cout``; ``groups == Cin == Cout`` is a depthwise conv.
        activation: ``"none"``, ``"relu"``, ``"relu6"``, ``"silu"`` or ``"hardswish"``.
        out_dtype: ``None`` (float32 for quantized ``x``, ``x.dtype`` for float ``x``), a float
            dtype, or ``torch.uint8`` / ``torch.int8`` for requantized output
            ``clamp(round(y * (1 / out_scale)) + out_zero_point)``.
        out_scale, out_zero_point: the requantization parameters (ignored for float output).
        residual: optional tensor of the output's shape ``[N, Cout, Ho, Wo]`` on ``x``'s device (any
            strides; channels_last memory is the fast layout), added before the activation:
            uint8 / int8 (dequantized with ``residual_scale`` / ``residual_zero_point``) or float32 /
            float16 / bfloat16 (taken as its fp32 value).
        residual_scale, residual_zero_point: a quantized residual's parameters (``residual_scale``
            finite and > 0 in float32, ``residual_zero_point`` in the residual dtype's range);
            ignored for a float residual.

    Returns:
        ``[N, Cout, Ho, Wo]`` in channels_last memory format.

    Example:
        >>> import torch, pycompress.ops as ops
        >>> x = torch.full((1, 1, 3, 3), 2, dtype=torch.uint8)
        >>> w = torch.ones(1, 1, 3, 3, dtype=torch.int8)
        >>> y = ops.int8_conv2d(x, w, torch.tensor([0.5]), x_scale=torch.tensor([1.0]),
        ...                     x_zero_point=torch.tensor([0], dtype=torch.int32), padding=1)
        >>> y[0, 0].tolist()
        [[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]
    """
    check_tensor("x", x, dtypes=_QUANT_DTYPES + FLOAT_DTYPES, ndim=4)
    _check_weight(w, groups)
    check_tensor("w_scale", w_scale, dtypes=(torch.float32,), ndim=1)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
    s, p, d = _pair("stride", stride, 1), _padding(padding), _pair("dilation", dilation, 1)
    n, cin, h, wd = x.shape
    cout, cg, kh, kw = w.shape
    if cin % groups != 0:
        raise ValueError(f"groups={groups} must divide the input channels (x has {cin})")
    if cin != cg * groups:
        raise ValueError(
            f"x has {cin} channels but w {tuple(w.shape)} with groups={groups} expects {cg * groups}"
        )
    ho, wo = int8_conv2d_output_size((h, wd), (kh, kw), s, p, d)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"the output would be empty: input {h}x{wd} with padding {tuple(_op_padding(p))} is smaller than the dilated "
            f"kernel {d[0] * (kh - 1) + 1}x{d[1] * (kw - 1) + 1}"
        )
    if w_scale.shape[0] != cout:
        raise ValueError(f"w_scale must have Cout = {cout} elements, got {w_scale.shape[0]}")
    if bias is not None and bias.shape[0] != cout:
        raise ValueError(f"bias must have Cout = {cout} elements, got {bias.shape[0]}")
    if not isinstance(activation, str) or activation not in INT8_CONV_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(INT8_CONV_ACTIVATIONS)}; got {activation!r}")
    if out_dtype is not None and out_dtype not in _OUT_DTYPES:
        raise TypeError(
            f"out_dtype must be None, float32, float16, bfloat16, uint8 or int8; got {out_dtype!r}"
        )
    quant_out = out_dtype in _QUANT_DTYPES
    if isinstance(out_scale, bool) or not isinstance(out_scale, (int, float)):
        raise TypeError(f"out_scale must be a float, got {out_scale!r}")
    if isinstance(out_zero_point, bool) or not isinstance(out_zero_point, int):
        raise TypeError(f"out_zero_point must be an int, got {out_zero_point!r}")
    if quant_out:
        s32 = _f32(out_scale)
        if not (math.isfinite(s32) and s32 > 0 and math.isfinite(_f32(1.0 / s32))):
            raise ValueError(f"out_scale must be finite and > 0 for {out_dtype} output, got {out_scale}")
        lo, hi = (0, 255) if out_dtype == torch.uint8 else (-128, 127)
        if not lo <= out_zero_point <= hi:
            raise ValueError(f"out_zero_point must lie in [{lo}, {hi}] for {out_dtype} output, got {out_zero_point}")

    if isinstance(residual_scale, bool) or not isinstance(residual_scale, (int, float)):
        raise TypeError(f"residual_scale must be a float, got {residual_scale!r}")
    if isinstance(residual_zero_point, bool) or not isinstance(residual_zero_point, int):
        raise TypeError(f"residual_zero_point must be an int, got {residual_zero_point!r}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=_QUANT_DTYPES + FLOAT_DTYPES)
        if tuple(residual.shape) != (n, cout, ho, wo):
            raise ValueError(
                f"residual must have the output's shape [N, Cout, Ho, Wo] = {[n, cout, ho, wo]}, "
                f"got {list(residual.shape)}"
            )
        if residual.dtype in _QUANT_DTYPES:
            rs32 = _f32(residual_scale)
            if not (math.isfinite(rs32) and rs32 > 0):
                raise ValueError(
                    f"residual_scale must be finite and > 0 (in float32) for a {residual.dtype} residual, "
                    f"got {residual_scale}"
                )
            lo, hi = (0, 255) if residual.dtype == torch.uint8 else (-128, 127)
            if not lo <= residual_zero_point <= hi:
                raise ValueError(
                    f"residual_zero_point must lie in [{lo}, {hi}] for a {residual.dtype} residual, "
                    f"got {residual_zero_point}"
                )

    x_quant = x.dtype in _QUANT_DTYPES
    if x_quant and (x_scale is None or x_zero_point is None):
        raise ValueError(f"quantized x ({x.dtype}) needs x_scale and x_zero_point")
    if not x_quant and (x_scale is None) != (x_zero_point is None):
        raise ValueError("float x takes both x_scale and x_zero_point (static quantization) or neither (dynamic)")
    if x_scale is not None:
        check_tensor("x_scale", x_scale, dtypes=(torch.float32,), ndim=1)
        check_tensor("x_zero_point", x_zero_point, dtypes=(torch.int32,), ndim=1)
        for name, t in (("x_scale", x_scale), ("x_zero_point", x_zero_point)):
            if t.shape[0] not in (1, n):
                raise ValueError(f"{name} must have shape [1] or [N] = [{n}], got {tuple(t.shape)}")
    device = check_same_device(
        x=x, w=w, w_scale=w_scale, bias=bias, x_scale=x_scale, x_zero_point=x_zero_point, residual=residual
    )
    check_device_supported(device, "int8_conv2d")
    if w_packed is not None:
        check_tensor("w_packed", w_packed, dtypes=(torch.int8,), ndim=1)
        expect = int8_conv2d_packed_bytes(cout, cg, kh, kw, groups)
        if w_packed.device != w.device:
            w_packed = None
        elif w_packed.numel() != expect:
            raise ValueError(
                f"w_packed must be int8_conv2d_pack_weight(w, groups={groups}) ({expect} bytes), got {w_packed.numel()}"
            )
    # values inside tensors (finite scales, zero points in range, finite x for dynamic
    # quantization) are checked by the kernel, which raises ValueError naming the problem
    return torch.ops.pycompress.int8_conv2d(
        x, x_scale, x_zero_point, w, w_scale, bias, w_packed, s, _op_padding(p), d, groups, activation, out_dtype,
        float(out_scale), int(out_zero_point), residual, float(residual_scale), int(residual_zero_point),
    )
