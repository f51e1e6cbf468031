"""``Int8Conv2d``: a drop-in replacement for ``nn.Conv2d`` with int8 weights and int8 arithmetic."""

from __future__ import annotations

import math

import torch
from torch import nn

from pycompress._ext import direct_op, plain_eager

__all__ = ["Int8Conv2d", "ACTIVATIONS", "activation_module", "activation_function"]

# activations the op applies in its fp32 epilogue (after bias, before any requantization)
ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish")
_OUTPUT_DTYPES = {None: None, "uint8": torch.uint8}
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_direct_conv = direct_op("int8_conv2d")


def activation_module(name: str) -> nn.Module:
    """The float ``nn`` module computing the activation called ``name`` (``nn.Identity`` for "none")."""
    return {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU,
            "hardswish": nn.Hardswish}[name]()


def activation_function(name: str):
    """``fn(tensor) -> tensor`` applying the activation called ``name`` (out of place)."""
    F = torch.nn.functional
    return {"none": lambda t: t, "relu": torch.relu, "relu6": F.relu6, "silu": F.silu,
            "hardswish": F.hardswish}[name]


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(a, int) and not isinstance(a, bool) for a in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _padding(v) -> tuple[int, ...]:
    """``(ph, pw)`` (both sides) or, when the sides differ, ``(top, bottom, left, right)``."""
    if isinstance(v, (tuple, list)) and len(v) == 4 and all(isinstance(a, int) and not isinstance(a, bool) for a in v):
        t, b, l, r = (int(a) for a in v)
        return (t, l) if t == b and l == r else (t, b, l, r)
    try:
        return _pair(v, "padding")
    except ValueError:
        raise ValueError(f"padding must be an int, a pair of ints or 4 ints (top, bottom, left, right), "
                         f"got {v!r}") from None


def pad_module_padding(pad: nn.Module) -> tuple[int, int, int, int] | None:
    """``(top, bottom, left, right)`` of a zero-padding module (``nn.ZeroPad2d``, or
    ``nn.ConstantPad2d`` with value 0) that only adds rows and columns, else None."""
    if type(pad) is nn.ZeroPad2d or (type(pad) is nn.ConstantPad2d and float(pad.value) == 0.0):
        p = pad.padding
        if isinstance(p, int):
            p = (p, p, p, p)
        if len(p) == 4 and all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in p):
            left, right, top, bottom = (int(a) for a in p)
            return (top, bottom, left, right)
    return None


def conv_padding(conv: nn.Conv2d) -> tuple[int, ...]:
    """The zero padding of ``conv``: ``(ph, pw)`` on both sides, or ``(top, bottom, left, right)``
    where torch pads asymmetrically (``padding="same"`` with an even receptive field ``d * (k - 1)``:
    the extra row / column goes after the image, as torch's own ``"same"`` does)."""
    p = conv.padding
    if isinstance(p, str):
        if p == "valid":
            return (0, 0)
        sides = []
        for d, k in zip(conv.dilation, conv.kernel_size):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return _padding(tuple(sides))
    return (int(p[0]), int(p[1]))


def _check_qparams(what: str, scale, zero_point) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp32 [1], zero point int32 [1]) from numbers or one-element tensors, validated."""
    s = float(scale.reshape(-1)[0]) if isinstance(scale, torch.Tensor) and scale.numel() == 1 else scale
    z = int(zero_point.reshape(-1)[0]) if isinstance(zero_point, torch.Tensor) and zero_point.numel() == 1 else zero_point
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise TypeError(f"{what} scale must be a number or a one-element tensor, got {type(scale).__name__}")
    s32 = torch.tensor([float(s)], dtype=torch.float32)
    if not (math.isfinite(float(s)) and float(s32) > 0):
        raise ValueError(f"{what} scale must be finite and > 0, got {s!r}")
    if isinstance(z, bool) or not isinstance(z, int):
        raise TypeError(f"{what} zero point must be an int or a one-element tensor, got {type(zero_point).__name__}")
    if not 0 <= z <= 255:
        raise ValueError(f"{what} zero point must be in [0, 255] (uint8), got {z}")
    return s32, torch.tensor([z], dtype=torch.int32)


class Int8Conv2d(nn.Module):
    """2-D convolution with per-output-channel symmetric int8 weights and uint8 activations.

    The input is quantized to uint8 (asymmetric, per tensor) at the entry of the op, either with
    the static ``input_scale`` / ``input_zero_point`` found by calibration, or, when the layer has
    none, dynamically per image (``scale = (max(0, max x) - min(0, min x)) / 255``). The products
    are summed exactly in int32 and dequantized in a fused fp32 epilogue that adds the bias and
    applies ``activation`` (``"none"``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"``; a
    BatchNorm folded into the weight and the activation that followed the conv are computed
    here). The output is float (``output_dtype=None``: the input's float dtype; for a uint8 input
    ``float_dtype``, float32 by default) or, with ``output_dtype=torch.uint8``, requantized with ``output_scale`` /
    ``output_zero_point`` so that the next ``Int8Conv2d`` (whose input quantization is the same)
    reads it without a float round trip.

    Inputs: float32 / float16 / bfloat16 ``[N, C, H, W]`` tensors, or uint8 tensors already
    quantized with this layer's static input quantization.

    Padding (with the input's zero point, the real value 0) is ``padding = (ph, pw)`` on both
    sides, or ``(top, bottom, left, right)`` when the sides differ: ``from_float(conv, pad=...)``
    adds a zero-padding module that ran before the conv (TensorFlow's "SAME" padding of stride-2
    convs, one more row and column after the image), so that the module's float copy never runs.

    Residual blocks: a layer built with ``residual=True`` is called as ``layer(x, residual)`` and
    computes ``activation(conv(x) + bias + residual)`` in its epilogue, the addition of a ResNet or
    inverted-residual block (``relu(bn(conv(x)) + identity)``, ``x + project(x)``) and the
    activation after it, so that the block's output can be requantized to uint8 at once.
    ``residual`` is a float tensor, or a uint8 tensor quantized with ``residual_scale`` /
    ``residual_zero_point`` (:meth:`set_residual_quantization`); a residual of another shape
    than the output (broadcast by the addition) is added in float after the op. Calibration also
    records the range of ``conv(x) + bias`` before the addition (``sum_scale`` /
    ``sum_zero_point``, :meth:`set_sum_quantization`); the op does not use it (it adds in fp32),
    the ONNX export does, where ONNX Runtime's fused conv must write the sum as 8 bits.

    Buffers (all in ``state_dict``): ``weight`` int8 ``[out, in / groups, kh, kw]``,
    ``weight_scale`` fp32 ``[out]``, ``bias`` fp32 ``[out]`` or None, ``input_scale`` fp32 ``[1]``
    and ``input_zero_point`` int32 ``[1]`` (None: dynamic quantization), ``output_scale`` fp32
    ``[1]`` and ``output_zero_point`` int32 ``[1]`` (None: float output), ``residual_scale`` fp32
    ``[1]`` and ``residual_zero_point`` int32 ``[1]`` (None: no uint8 residual), ``sum_scale`` fp32
    ``[1]`` and ``sum_zero_point`` int32 ``[1]`` (None: not calibrated). Float outputs are
    contiguous (``[N, C, H, W]`` memory order, what code written for torch's conv expects, e.g.
    ``.view``) unless ``channels_last_output=True``: ``quantize`` sets it where the graph shows
    that nothing after the layer depends on the layout (no ``.view``, not the model's output),
    which saves a copy; uint8 outputs are always channels-last. On the CPU the weight
    is also kept packed for the kernel in the non-persistent buffer ``weight_packed``, rebuilt
    after ``load_state_dict``, after moving the layer to the CPU and by :meth:`repack` (call it
    after editing buffers in place).

    Example:
        >>> import torch
        >>> from pycompress.nn import Int8Conv2d
        >>> conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        >>> q = Int8Conv2d.from_float(conv)
        >>> x = torch.randn(2, 8, 12, 12)
        >>> y = q(x)
        >>> y.shape, bool((y - conv(x)).norm() / conv(x).norm() < 0.02)
        (torch.Size([2, 16, 12, 12]), True)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        activation: str = "none",
        static_input: bool = False,
        output_dtype=None,
        channels_last_output: bool = False,
        fused_modules=(),
        float_dtype=None,
        residual: bool = False,
        static_residual: bool = False,
        static_sum: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        # (ph, pw) on both sides, or (top, bottom, left, right) when the sides differ
        self.padding = _padding(padding)
        self.dilation = _pair(dilation, "dilation")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"kernel_size, stride, dilation must be >= 1 and padding >= 0, got kernel_size="
                             f"{self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.groups = int(groups)
        self.activation = activation
        self.channels_last_output = bool(channels_last_output)
        # forward(x, residual): the residual addition of a block, before the activation
        self.residual = bool(residual)
        if static_residual and not self.residual:
            raise ValueError("static_residual=True needs residual=True")
        if static_sum and not self.residual:
            raise ValueError("static_sum=True needs residual=True")
        # the float dtype of the output for a uint8 input (a layer inside an fp16 / bf16 model)
        self.float_dtype = _FLOAT_DTYPE_NAMES.get(float_dtype, float_dtype) if float_dtype is not None else None
        if self.float_dtype is not None and self.float_dtype not in _FLOAT_INPUTS:
            raise ValueError(f"float_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {float_dtype!r}")
        # names (in the model) of the modules whose computation this layer took over: a folded
        # BatchNorm, a fused activation; informational (reports compare against their output)
        self.fused_modules: tuple[str, ...] = tuple(str(n) for n in fused_modules)
        self.layer_name: str | None = None  # the model's name for this layer, used in error messages
        kh, kw = self.kernel_size
        self.register_buffer("weight", torch.zeros(out_channels, in_channels // groups, kh, kw, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32, device=device) if bias else None)
        self.register_buffer("input_scale", None)
        self.register_buffer("input_zero_point", None)
        self.register_buffer("output_scale", None)
        self.register_buffer("output_zero_point", None)
        self.register_buffer("residual_scale", None)
        self.register_buffer("residual_zero_point", None)
        self.register_buffer("sum_scale", None)
        self.register_buffer("sum_zero_point", None)
        self.register_buffer("weight_packed", torch.empty(0, dtype=torch.int8, device=device), persistent=False)
        self._out_scale = 1.0
        self._out_zero_point = 0
        self._res_scale = 1.0
        self._res_zero_point = 0
        if static_residual:
            self.set_residual_quantization(1.0, 0)
        if static_sum:
            self.set_sum_quantization(1.0, 0)
        if static_input:
            self.set_input_quantization(1.0, 0)
        out = self._output_dtype_from(output_dtype)
        if out is not None:
            self.set_output_quantization(1.0, 0)
        self.register_load_state_dict_post_hook(Int8Conv2d._after_load)
        self.repack()

    @staticmethod
    def _output_dtype_from(output_dtype):
        if output_dtype is torch.uint8:
            return torch.uint8
        if output_dtype in _OUTPUT_DTYPES and not isinstance(output_dtype, torch.dtype):
            return _OUTPUT_DTYPES[output_dtype]
        raise ValueError(f"output_dtype must be None (float output) or torch.uint8, got {output_dtype!r}")

    # ------------------------------------------------------------------ properties
    @property
    def static_input(self) -> bool:
        """Whether the input quantization is static (calibrated) rather than per image."""
        return self.input_scale is not None

    @property
    def output_dtype(self):
        """``None`` (float output) or ``torch.uint8`` (requantized output)."""
        return torch.uint8 if self.output_scale is not None else None

    @property
    def padding4(self) -> tuple[int, int, int, int]:
        """The zero-point padding as ``(top, bottom, left, right)``."""
        p = self.padding
        return tuple(p) if len(p) == 4 else (p[0], p[0], p[1], p[1])

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _where(self) -> str:
        return f"Int8Conv2d {self.layer_name!r}" if self.layer_name else f"Int8Conv2d({self.extra_repr()})"

    # ------------------------------------------------------------------ quantization parameters
    @torch.no_grad()
    def set_input_quantization(self, scale, zero_point) -> None:
        """Static uint8 input quantization (``real = (q - zero_point) * scale``); ``scale=None``
        switches back to dynamic per-image quantization."""
        self.input_scale, self.input_zero_point = self._qparam_buffers("input", scale, zero_point)

    @torch.no_grad()
    def set_output_quantization(self, scale, zero_point) -> None:
        """uint8 output requantized with ``scale`` / ``zero_point``; ``scale=None`` switches back to
        float output."""
        self.output_scale, self.output_zero_point = self._qparam_buffers("output", scale, zero_point)
        self._sync_output_qparams()

    @torch.no_grad()
    def set_residual_quantization(self, scale, zero_point) -> None:
        """The quantization of a uint8 residual input (``real = (q - zero_point) * scale``, the
        output quantization of the layer that produced it); ``scale=None``: float residuals only."""
        if scale is not None and not self.residual:
            raise ValueError(f"{self._where()}: set_residual_quantization on a layer without a residual input")
        self.residual_scale, self.residual_zero_point = self._qparam_buffers("residual", scale, zero_point)
        self._sync_output_qparams()

    @torch.no_grad()
    def set_sum_quantization(self, scale, zero_point) -> None:
        """The calibrated uint8 range of ``conv(x) + bias`` before the residual addition
        (``real = (q - zero_point) * scale``), which the ONNX export uses where ONNX Runtime's
        fused conv writes 8 bits; the op itself adds the residual in fp32. ``scale=None``: none."""
        if scale is not None and not self.residual:
            raise ValueError(f"{self._where()}: set_sum_quantization on a layer without a residual input")
        self.sum_scale, self.sum_zero_point = self._qparam_buffers("sum", scale, zero_point)

    def _qparam_buffers(self, what: str, scale, zero_point):
        """(scale fp32 [1], zero point int32 [1]) on the layer's device, validated; (None, None)
        for ``scale=None``."""
        if scale is None:
            return None, None
        s, z = _check_qparams(f"{self._where()}: {what}", scale, zero_point)
        dev = self.weight.device
        return s.to(dev), z.to(dev)

    def _sync_output_qparams(self) -> None:
        # the op takes the output quantization as numbers: kept next to the buffers so that forward
        # never reads a tensor value (no host sync, no graph break under torch.compile)
        if self.output_scale is None:
            self._out_scale, self._out_zero_point = 1.0, 0
        else:
            self._out_scale = float(self.output_scale.reshape(-1)[0])
            self._out_zero_point = int(self.output_zero_point.reshape(-1)[0])
        if self._buffers.get("residual_scale") is None:
            self._res_scale, self._res_zero_point = 1.0, 0
        else:
            self._res_scale = float(self.residual_scale.reshape(-1)[0])
            self._res_zero_point = int(self.residual_zero_point.reshape(-1)[0])

    # ------------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def from_float(cls, conv: nn.Conv2d, activation: str = "none", input_quantization=None,
                   output_quantization=None, pad: nn.Module | None = None, residual: bool = False) -> "Int8Conv2d":
        """Quantizes ``conv`` (per output channel: ``scale = absmax / 127``, round half to even).

        Args:
            conv: an ``nn.Conv2d`` with zero padding (``padding_mode="zeros"``) and float weights.
            pad: a zero-padding module applied before ``conv`` (``nn.ZeroPad2d``, or
                ``nn.ConstantPad2d`` with value 0, non-negative padding) that the layer computes as
                well: its padding is added to the conv's own (possibly asymmetric, stored as
                ``(top, bottom, left, right)``); the caller replaces the module by ``nn.Identity``.
            activation: the activation to apply after the bias (see :data:`ACTIVATIONS`).
            input_quantization: ``None`` (dynamic per image) or ``(scale, zero_point)``.
            output_quantization: ``None`` (float output) or ``(scale, zero_point)`` for uint8 output.
            residual: the layer adds a residual input before ``activation`` (``layer(x, residual)``).

        Raises:
            TypeError: not an ``nn.Conv2d`` or a weight that is not floating point.
            ValueError: another padding mode, NaN/inf weights or bias, bad quantization
                parameters.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_float expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported (only zero padding)")
        padding = conv_padding(conv)
        if pad is not None:
            extra = pad_module_padding(pad)
            if extra is None:
                raise ValueError(f"from_float: pad must be an nn.ZeroPad2d or an nn.ConstantPad2d with value 0 "
                                 f"and padding >= 0, got {pad!r}")
            own = padding if len(padding) == 4 else (padding[0], padding[0], padding[1], padding[1])
            padding = _padding(tuple(a + b for a, b in zip(own, extra)))
        if not conv.weight.dtype.is_floating_point:
            raise TypeError(f"the weight dtype {conv.weight.dtype} is not a floating type")
        w = conv.weight.detach().float()
        if not torch.isfinite(w).all():
            raise ValueError("from_float: the weight holds NaN or inf values")
        if conv.bias is not None and not torch.isfinite(conv.bias.detach()).all():
            raise ValueError("from_float: the bias holds NaN or inf values")
        absmax = w.abs().amax(dim=(1, 2, 3))
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        q = torch.round(w / scale[:, None, None, None]).clamp_(-127, 127).to(torch.int8)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                conv.groups, bias=conv.bias is not None, activation=activation, residual=residual, device=w.device)
        m.weight.copy_(q)
        m.weight_scale.copy_(scale)
        if conv.bias is not None:
            m.bias.copy_(conv.bias.detach().float())
        if input_quantization is not None:
            m.set_input_quantization(*input_quantization)
        if output_quantization is not None:
            m.set_output_quantization(*output_quantization)
        m.repack()
        return m

    def config(self) -> dict:
        """JSON-serializable description from which :meth:`from_config` rebuilds the layer."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "activation": self.activation,
            "static_input": self.static_input,
            "output_dtype": "uint8" if self.output_dtype is not None else None,
            "channels_last_output": self.channels_last_output,
            "fused_modules": list(self.fused_modules),
            "float_dtype": str(self.float_dtype).replace("torch.", "") if self.float_dtype is not None else None,
            "residual": self.residual,
            "static_residual": self.residual_scale is not None,
            "static_sum": self.sum_scale is not None,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> "Int8Conv2d":
        """Builds a layer with buffers of the right shapes (values to be loaded with ``load_state_dict``)."""
        return cls(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg.get("stride", 1)),
                   tuple(cfg.get("padding", 0)), tuple(cfg.get("dilation", 1)), cfg.get("groups", 1),
                   bias=cfg.get("bias", True), activation=cfg.get("activation", "none"),
                   static_input=bool(cfg.get("static_input", False)), output_dtype=cfg.get("output_dtype"),
                   channels_last_output=bool(cfg.get("channels_last_output", False)),
                   fused_modules=tuple(cfg.get("fused_modules", ())), float_dtype=cfg.get("float_dtype"),
                   residual=bool(cfg.get("residual", False)), static_residual=bool(cfg.get("static_residual", False)),
                   static_sum=bool(cfg.get("static_sum", False)))

    def dequantize_output(self, y: torch.Tensor) -> torch.Tensor:
        """The real values of an output of this layer: ``(y - output_zero_point) * output_scale``
        for a uint8 output, ``y`` itself for a float one."""
        if y.dtype != torch.uint8 or self.output_scale is None:
            return y
        return (y.float() - self.output_zero_point.float()) * self.output_scale

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight ``weight * weight_scale`` (what the int8 weight stands for)."""
        return self.weight.float() * self.weight_scale.float()[:, None, None, None]

    @torch.no_grad()
    def to_float(self, with_activation: bool = False) -> nn.Module:
        """The dequantized equivalent ``nn.Conv2d`` (fp32, same device).

        A fused activation (``self.activation != "none"``) is not part of a ``Conv2d``: with
        ``with_activation=True`` the result is ``nn.Sequential(conv, activation)`` instead. An
        asymmetric padding is not either: the result is then ``nn.Sequential(nn.ZeroPad2d, conv)``
        (the conv unpadded; the activation last with ``with_activation=True``). The activation
        quantization is not represented (the float layer computes in float), nor is the residual
        addition of a ``residual=True`` layer (the result is the conv before it; use
        ``with_activation=False`` there, since the activation follows the addition).
        """
        asym = len(self.padding) == 4
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         (0, 0) if asym else self.padding, self.dilation, self.groups, bias=self.bias is not None,
                         device=self.weight.device)
        conv.weight.copy_(self.dequantized_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias.float())
        parts: list[nn.Module] = []
        if asym:
            t, b, l, r = self.padding4
            parts.append(nn.ZeroPad2d((l, r, t, b)))
        parts.append(conv)
        if with_activation and self.activation != "none":
            parts.append(activation_module(self.activation))
        return parts[0] if len(parts) == 1 else nn.Sequential(*parts)

    # ------------------------------------------------------------------ packing
    @torch.no_grad()
    def repack(self) -> None:
        """Re-packs ``weight`` for the CPU kernel (an empty buffer off the CPU) and re-reads the
        output quantization; call it after editing the buffers in place."""
        self._sync_output_qparams()
        pack = getattr(torch.ops.pycompress, "int8_conv2d_pack_weight", None) if _has_op() else None
        if self.weight.device.type == "cpu" and pack is not None:
            self.weight_packed = pack(self.weight, self.groups)
        else:
            self.weight_packed = torch.empty(0, dtype=torch.int8, device=self.weight.device)

    def _packed_bytes(self) -> int:
        import pycompress.ops as ops

        size = getattr(ops, "int8_conv2d_packed_bytes", None)
        if size is None:
            return 0
        return size(self.out_channels, self.in_channels // self.groups, *self.kernel_size, self.groups)

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        module.repack()

    def _apply(self, fn, recurse=True):
        before = {k: self._buffers[k] for k in ("weight_scale", "bias", "input_scale", "output_scale", "residual_scale",
                                                "sum_scale")}
        moved = super()._apply(fn, recurse)
        # a cast of the whole model (.half(), .to(torch.bfloat16), .float()) sets the float dtype
        # of the outputs of uint8 inputs: fn maps floats of both widths to one dtype only then
        try:
            a, b = fn(torch.zeros(1, dtype=torch.float16)), fn(torch.zeros(1, dtype=torch.float32))
        except Exception:  # a function that takes only this layer's own tensors
            a = b = None
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
                and a.dtype in _FLOAT_INPUTS:
            self.float_dtype = None if a.dtype == torch.float32 else a.dtype
        # dtype casts (.half(), .to(bf16)) must not round the fp32 scales and bias the op reads,
        # and the packed copy is valid only next to a CPU weight
        for k, old in before.items():
            cur = self._buffers.get(k)
            if cur is not None and cur.dtype != torch.float32:
                self._buffers[k] = old.to(device=cur.device, dtype=torch.float32)
        if self.weight.device.type == "cpu" and (self.weight_packed.device.type != "cpu"
                                                 or self.weight_packed.numel() != self._packed_bytes()):
            self.repack()
        elif self.weight.device.type != "cpu" and self.weight_packed.numel() != 0:
            self.weight_packed = torch.empty(0, dtype=torch.int8, device=self.weight.device)
        return moved

    # ------------------------------------------------------------------ forward
    def output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw), p = self.kernel_size, self.stride, self.dilation, self.padding
        pv, ph = (p[0] + p[1], p[2] + p[3]) if len(p) == 4 else (2 * p[0], 2 * p[1])
        return ((h + pv - dh * (kh - 1) - 1) // sh + 1, (w + ph - dw * (kw - 1) - 1) // sw + 1)

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._where()}: expects a tensor, got {type(x).__name__}")
        shape = x.shape
        if len(shape) != 4:
            raise ValueError(f"{self._where()}: expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
        if shape[1] != self.in_channels:
            raise ValueError(f"{self._where()}: expects {self.in_channels} input channels, got an input of shape "
                             f"{tuple(x.shape)} ({x.shape[1]} channels)")
        if x.dtype == torch.uint8:
            if self.input_scale is None:
                raise ValueError(
                    f"{self._where()}: got a uint8 (already quantized) input, but the layer has no static input "
                    "quantization to read it with (dynamic layers take float inputs)")
        elif x.dtype not in _FLOAT_INPUTS:
            raise TypeError(f"{self._where()}: input dtype {x.dtype} is not supported (float32, float16, bfloat16, "
                            "or uint8 quantized with the layer's input quantization)")
        if x.device != self._buffers["weight"].device:
            raise ValueError(f"{self._where()}: input on {x.device} but the layer is on {self.weight.device}")
        ho, wo = self.output_size(shape[2], shape[3])
        if ho < 1 or wo < 1:
            raise ValueError(f"{self._where()}: input of spatial size {tuple(x.shape[2:])} is too small for the "
                             f"kernel {self.kernel_size} (dilation {self.dilation}, padding {self.padding})")

    def _check_residual(self, x: torch.Tensor, residual, device: bool = False) -> bool:
        """Validates the residual input; True when it has the output's shape (added by the op).
        ``device``: also compare its device with the layer's (the op checks it otherwise)."""
        if not self.residual:
            if residual is not None:
                raise ValueError(f"{self._where()}: got a residual input, but the layer was built without one "
                                 "(residual=False)")
            return False
        if residual is None:
            raise ValueError(f"{self._where()}: the layer adds a residual input: call it as layer(x, residual)")
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{self._where()}: the residual must be a tensor, got {type(residual).__name__}")
        b = self._buffers
        if residual.dtype == torch.uint8:
            if b["residual_scale"] is None:
                raise ValueError(f"{self._where()}: got a uint8 residual, but the layer has no residual quantization "
                                 "to read it with (set_residual_quantization)")
        elif residual.dtype not in _FLOAT_INPUTS:
            raise TypeError(f"{self._where()}: residual dtype {residual.dtype} is not supported (float32, float16, "
                            "bfloat16, or uint8 with the layer's residual quantization)")
        if device and residual.device != b["weight"].device:
            raise ValueError(f"{self._where()}: residual on {residual.device} but the layer is on {b['weight'].device}")
        ho, wo = self.output_size(x.shape[2], x.shape[3])
        rs = residual.shape
        return len(rs) == 4 and rs[0] == x.shape[0] and rs[1] == self.out_channels and rs[2] == ho and rs[3] == wo

    def _out_dtype(self, x: torch.Tensor):
        if self._buffers["output_scale"] is not None:
            return torch.uint8
        return self.float_dtype if x.dtype == torch.uint8 else None

    def _op(self, x, activation, out_dtype, residual=None):
        b = self._buffers
        packed = b["weight_packed"]
        args = (x, b["input_scale"], b["input_zero_point"], b["weight"], b["weight_scale"], b["bias"],
                packed if packed.numel() else None, self.stride, self.padding, self.dilation,
                self.groups, activation, out_dtype, self._out_scale, self._out_zero_point)
        if (_direct_conv is not None and plain_eager(x)
                and (residual is None or residual.__class__ is torch.Tensor)):
            # plain tensors in eager mode: the typed entry point of the same op (see _ext.direct_op)
            return _direct_conv(*args, residual, self._res_scale, self._res_zero_point)
        if residual is None:
            return torch.ops.pycompress.int8_conv2d.default(*args)
        return torch.ops.pycompress.int8_conv2d.default(*args, residual, self._res_scale, self._res_zero_point)

    def _broadcast_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # a residual of another shape (broadcast by the float model's addition): the op's fp32
        # sum, then the same activation and output steps in torch
        y = self._op(x, "none", torch.float32)
        r = residual
        if r.dtype == torch.uint8:
            r = (r.to(torch.int32) - self.residual_zero_point).float() * self.residual_scale
        try:
            y = y + r.float()
        except RuntimeError as e:
            raise ValueError(f"{self._where()}: the residual of shape {tuple(residual.shape)} cannot be added to the "
                             f"output of shape {tuple(y.shape)}: {e}") from None
        y = activation_function(self.activation)(y)
        if self.output_scale is not None:
            inv = torch.tensor(1.0, dtype=torch.float32) / self.output_scale.cpu()
            q = torch.round(y * inv.to(y.device)) + self._out_zero_point
            return q.clamp_(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)
        return y.to(self._out_dtype(x) or (x.dtype if x.dtype in _FLOAT_INPUTS else torch.float32))

    def conv_output(self, x: torch.Tensor) -> torch.Tensor:
        """The float32 output of the convolution and bias alone (no residual, no activation, no
        requantization): what a folded ``conv -> BatchNorm`` of the float model computes."""
        self._check_input(x)
        return self._op(x, "none", torch.float32).contiguous()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        b = self._buffers
        # A model calls its layers once each per forward, so the checks of a call are a fixed cost
        # next to small convolutions: the common case is tested with a few comparisons here, the
        # op checks devices and sizes, and any failure is described by the full checks, which
        # name the layer.
        dt = x.dtype if isinstance(x, torch.Tensor) else None
        if not ((dt in _FLOAT_INPUTS or (dt == torch.uint8 and b["input_scale"] is not None))
                and x.dim() == 4 and x.shape[1] == self.in_channels):
            self._check_input(x)
        out_dtype = self._out_dtype(x)
        try:
            if residual is None and not self.residual:
                y = self._op(x, self.activation, out_dtype)
            elif self._check_residual(x, residual):
                y = self._op(x, self.activation, out_dtype, residual)
            else:
                y = self._broadcast_residual(x, residual)
        except (RuntimeError, ValueError, TypeError):
            # the layer's own message when the inputs are the cause
            self._check_input(x)
            self._check_residual(x, residual, device=True)
            raise
        if out_dtype is not torch.uint8 and not self.channels_last_output:
            # code after the layer may .view() its output: contiguous, as torch's conv returns it
            # for a contiguous input (the input here may be channels-last because of the int8
            # layers before it)
            y = y.contiguous()
        return y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}")
        if any(self.padding):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.residual:
            s += ", residual=" + ("uint8" if self.residual_scale is not None else "float")
        if self.activation != "none":
            s += f", activation={self.activation}"
        s += ", input=" + ("static" if self.static_input else "dynamic")
        if self.output_dtype is not None:
            s += ", output=uint8"
        elif self.channels_last_output:
            s += ", channels_last_output=True"
        return s


def _has_op() -> bool:
    try:
        from pycompress import _ext  # noqa: F401  (loads the kernels)
    except Exception:  # pragma: no cover - the extension is part of every build
        return False
    return hasattr(torch.ops.pycompress, "int8_conv2d")
