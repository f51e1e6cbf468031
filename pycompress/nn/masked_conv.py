"""MaskedConv2d: a training-time 2-D convolution whose pruned weights stay exactly zero."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pycompress.nn._common import MaskedWeight

__all__ = ["MaskedConv2d"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(a, int) and not isinstance(a, bool) for a in v):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


class _MaskedConv2dFn(torch.autograd.Function):
    """``conv2d(x, weight * mask, bias)``. The masked weight is a temporary of each call (freed when
    the call returns, never saved for backward): backward keeps ``x``, ``weight`` and the bool mask,
    and the weight gradient is exactly zero where the mask is False."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, stride, padding, dilation, groups):
        y = F.conv2d(x, weight.masked_fill(~mask, 0), bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, mask)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gw = gb = None
        if need_x or need_w:
            w = weight.masked_fill(~mask, 0) if need_x else weight
            gx, gw, _ = torch.ops.aten.convolution_backward(
                grad, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
                [need_x, need_w, False])
            if gw is not None:
                gw = gw.masked_fill(~mask, 0)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = grad.sum((0, 2, 3))
        return gx, gw, None, gb, None, None, None, None


class MaskedConv2d(MaskedWeight, nn.Module):
    """``conv2d(x, weight * mask) + bias`` whose pruned weights are held at exactly zero.

    The conv counterpart of :class:`~pycompress.nn.MaskedLinear`: parameters ``weight [out,
    in/groups, kh, kw]`` and ``bias [out]`` (optional), bool buffer ``mask`` of the weight's shape.
    Pruned entries of ``weight`` are zeroed when a mask is set and get an exactly zero gradient,
    so SGD (momentum, weight decay) and Adam/AdamW leave them at zero; the masked weight exists
    only during each call (no ``weight * mask`` copy is kept for backward). When masks change
    during training while an optimizer holds momentum for newly pruned weights, use
    :func:`~pycompress.nn.masked_linear.keep_masks` (or ``GradualPruning(optimizer=...)``).

    Same constructor arguments and attributes as ``torch.nn.Conv2d`` (``padding`` may be an int,
    a pair, ``"same"`` or ``"valid"``; every ``padding_mode``).

    Example:
        >>> import torch
        >>> from pycompress.nn import MaskedConv2d
        >>> conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        >>> mc = MaskedConv2d.from_float(conv, torch.rand(8, 4, 3, 3) > 0.5)
        >>> mc(torch.randn(2, 4, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                             f"divisible by groups ({groups})")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1 or (
                not isinstance(self.padding, str) and min(self.padding) < 0):
            raise ValueError("kernel_size, stride and dilation must be >= 1 and padding >= 0")
        self.padding_mode = padding_mode
        self._setup_padding()
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.register_buffer("mask", torch.ones(self.weight.shape, dtype=torch.bool, device=device))
        self.reset_parameters()

    def _setup_padding(self) -> None:
        """``_conv_pad``: the padding conv2d applies; ``_pre_pad``: an explicit F.pad before it
        (for non-zero padding modes and for an asymmetric ``"same"``), or None."""
        if self.padding == "valid":
            sym = [(0, 0), (0, 0)]
        elif self.padding == "same":
            sym = []
            for d, k in zip(self.dilation, self.kernel_size):
                total = d * (k - 1)
                sym.append((total // 2, total - total // 2))
        else:
            sym = [(p, p) for p in self.padding]
        symmetric = all(a == b for a, b in sym)
        if self.padding_mode == "zeros" and symmetric:
            self._conv_pad, self._pre_pad = (sym[0][0], sym[1][0]), None
        else:
            # F.pad takes the last dim first: (w_left, w_right, h_top, h_bottom)
            self._conv_pad = (0, 0)
            self._pre_pad = (sym[1][0], sym[1][1], sym[0][0], sym[0][1])

    def reset_parameters(self) -> None:
        """The initialization of ``torch.nn.Conv2d`` (mask reset to all True)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.mask.fill_(True)

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_float(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None,
                   share_parameters: bool = False) -> "MaskedConv2d":
        """Builds a MaskedConv2d from ``conv`` and a bool ``mask`` of the weight's shape (``None``
        keeps everything). Pruned weights are set to zero.

        Weights are copied, unless ``share_parameters=True``: then the new layer takes over the
        very ``Parameter`` objects of ``conv`` (zeroing its pruned entries in place), so an
        optimizer built on the original model keeps training the swapped layer.
        """
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, nn.ConvTranspose2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool tensor")
            if tuple(mask.shape) != tuple(conv.weight.shape):
                raise ValueError(f"mask must have the weight's shape {tuple(conv.weight.shape)}, "
                                 f"got {tuple(mask.shape)}")
        w = conv.weight
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode, device=w.device,
                dtype=w.dtype)
        if share_parameters:
            m.weight = conv.weight
            m.bias = conv.bias
        else:
            with torch.no_grad():
                m.weight.copy_(w)
                if conv.bias is not None:
                    m.bias.copy_(conv.bias)
        m.set_mask(torch.ones_like(w, dtype=torch.bool) if mask is None else mask)
        m.train(conv.training)
        return m

    from_dense = from_float

    @torch.no_grad()
    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with weight ``weight * mask``."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        conv.weight.copy_(self.weight * self.mask)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    to_dense = to_float

    # ------------------------------------------------------------------ mask
    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pre_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pre_pad, mode=mode)
        return _MaskedConv2dFn.apply(x, self.weight, self.mask, self.bias, self.stride, self._conv_pad,
                                     self.dilation, self.groups)

    # ------------------------------------------------------------------ save / load
    def config(self) -> dict:
        return {"type": "MaskedConv2d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "padding_mode": self.padding_mode, "dtype": str(self.weight.dtype).replace("torch.", "")}

    @classmethod
    def from_config(cls, cfg: dict) -> "MaskedConv2d":
        if not isinstance(cfg, dict):
            raise TypeError(f"cfg must be a dict, got {type(cfg).__name__}")
        dtype = getattr(torch, cfg.get("dtype", "float32"), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {cfg.get('dtype')!r}")
        pad = cfg.get("padding", 0)
        return cls(int(cfg["in_channels"]), int(cfg["out_channels"]), tuple(cfg["kernel_size"]),
                   stride=tuple(cfg.get("stride", (1, 1))), padding=pad if isinstance(pad, str) else tuple(pad),
                   dilation=tuple(cfg.get("dilation", (1, 1))), groups=int(cfg.get("groups", 1)),
                   bias=bool(cfg.get("bias", True)), padding_mode=cfg.get("padding_mode", "zeros"), dtype=dtype)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding!r}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", sparsity={100 * self.sparsity:.1f}%"
