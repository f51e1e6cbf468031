"""``pycompress.export_onnx``: compressed models as ONNX files with int8 operators for ONNX Runtime.

What each layer becomes
    * ``Int8Linear`` (``w8a8``), default form (``int8_format="auto"``, opset >= 15)::

          x2     = Reshape(x, [-1, K])                               # tokens as rows [M, K]
          absmax = Max(ReduceMax(x2), -ReduceMin(x2), 1e-30)         # [M, 1], no |x| tensor
          xs     = absmax / qmax                                     # qmax = 127 (63: act_bits=7)
          xq     = QuantizeLinear(x2, xs[M], 128, axis=0)            # per token, uint8 (64: act_bits=7)
          y      = com.microsoft.MatMulIntegerToFloat(xq, W, xs[M,1], w_scale[N], 128)
          y      = Reshape(y, [..., N]) + bias                        # shape [..., N] recorded

      ``W`` is the int8 weight ``[in, out]``. ONNX Runtime runs its u8 x s8 kernel (VNNI / AMX,
      ``vpmaddubsw`` on AVX2), scales by ``w_scale`` in the GEMM's output stage and by the
      per-token scale in a second pass over the output inside the same operator. The kernel's
      own bias input is added before that pass (it would be scaled by the per-token scale), so
      the bias is an ``Add`` after the output ``Reshape``. The output's shape is not recorded
      in the file, which keeps ONNX Runtime from fusing that ``Add`` with a residual ``Add`` and
      ``LayerNormalization`` into ``SkipLayerNormalization`` or with a ``Gelu`` into
      ``BiasGelu``, whose CPU kernels are slower than the separate operators
      (``_hide_int8_linear_shapes``). ONNX Runtime's common-subexpression pass quantizes
      an input shared by several layers (query, key, value) once; the PyTorch kernels quantize it
      once per layer, to the same integers. The integers are the PyTorch kernel's
      (round half to even, + zero point) except that ``QuantizeLinear`` divides by the scale
      where the kernel multiplies by ``qmax / absmax`` (an activation within one float rounding
      of a tie can land one step apart: 7 of 62 million in MiniLM). The epilogue rounds
      ``(acc * w_scale) * xs`` where the kernel rounds ``(acc * xs) * w_scale`` (a third of the
      outputs one rounding apart; the standard form keeps the kernel's order). The products are exact on CPUs with VNNI or AMX; on
      AVX2 alone ``vpmaddubsw`` adds pairs of u8 x s8 products in saturating int16, exact for
      7-bit activations (``act_bits=7``) or weights within [-64, 64] (``weight_bits=7``).
      ``int8_format="standard"`` writes standard operators only: ``MatMulInteger`` (u8 x u8
      with weights stored uint8 = int8 + 128 for 8-bit layers, exact everywhere; u8 x s8 for
      7-bit ones) → ``DequantizeLinear(acc, xs, axis=0)`` → ``Mul(w_scale)`` → ``Add(bias)``;
      ``"u8u8"`` / ``"u8s8"`` / ``"s8s8"`` force the types of that form and ``"contrib-*"`` those
      of the default form.
    * ``Int8Linear`` (``w8a16``): ``DequantizeLinear`` (per output channel, int8 initializer)
      ``→ MatMul → Add(bias)``. ONNX Runtime (>= 1.2x) fuses this pair into its ``MatMulNBits``
      kernel, which by default quantizes the activations to int8 internally (session option
      ``session.qdq_matmulnbits_accuracy_level``; set it to ``"1"`` for fp32 arithmetic).
    * ``MaskedLinear`` / ``SparseLinear``: a dense ``nn.Linear`` holding the weights with their
      zeros (``to_dense()``), exported as torch exports ``nn.Linear`` (``MatMul``/``Gemm``);
      ONNX has no standard sparse matrix product, so the file holds the dense fp32 weight.
    * ``Int8Conv2d``: ``QuantizeLinear`` to uint8 (calibrated layers: their input scale and zero
      point, as ``Mul`` by the reciprocal and ``QuantizeLinear`` with scale 1, the op's rounding;
      dynamic layers: per image, as the PyTorch op, see ``_emit_int8_conv2d``) →
      ``ConvInteger`` (uint8 weights = int8 + 128 with zero point 128; int8 weights for the forms
      that name them: ``u8s8``, ``s8s8``, ``contrib*``) → ``Cast`` → ``Mul(x_scale)``
      → ``Mul(w_scale [1, C, 1, 1])`` → ``Add(bias)`` → the fused activation (``Relu``,
      ``Clip(0, 6)``, ``Mul(y, Sigmoid(y))``, ``HardSwish``); a uint8 output is quantized so
      too and dequantized (``DequantizeLinear``) with the layer's output scale and zero point, from
      which the next layer's ``QuantizeLinear`` recovers the same integers (the exact form,
      ``int8_format="exact"``). By default (``"auto"``, and ``"qdq"``) the layers ONNX Runtime can
      fuse into ``QLinearConv`` (and a residual addition into ``QLinearAdd``) are written as
      ``DequantizeLinear`` around ``Conv`` instead, see ``_emit_qdq_conv2d``.
    * ``nn.Embedding`` tables of at least ``EMBEDDING_MIN_ELEMENTS`` values (not shared with
      another module, no ``max_norm``; ``int8_embeddings=True``): int8 with one fp32 scale per
      row, ``Gather`` of both → ``Cast`` → ``Mul``.
    * ``F.scaled_dot_product_attention`` (``attention="fused"``, default): one fused node, the
      standard ``Attention`` at opset >= 23 (the default opset where the installed exporter, onnx
      and onnxruntime have it), ONNX Runtime's ``com.microsoft.MultiHeadAttention`` below (not
      with the standard-operator ``int8_format`` values), on the 3-D ``[B, S, H * D]`` layout, see
      ``_emit_attention``; calls neither takes (dropout, head counts the exporter does not know,
      ...) and ``attention="exporter"`` keep the exporter's own form.
    * Everything else (including ``nn.Linear``) is exported by ``torch.onnx.export`` unchanged,
      except that the exact GELU of the torch.export-based exporter is written in the order ONNX
      Runtime fuses into one ``Gelu`` / ``BiasGelu`` kernel (same products, see ``_reorder_gelu``).

How
    The model is deep-copied and every int8 layer is swapped for an export-only module that
    calls a private custom op (``torch.ops.pycompress_onnx.*``) whose ONNX form is written by
    this file: one builder per layer type emits the node list through a tiny adapter, used both
    by the torch.export-based exporter (``custom_translation_table``, torch >= 2.6, needs
    ``onnxscript``) and by the TorchScript exporter (``register_custom_op_symbolic``; the
    fallback for torch 2.4 / 2.5). Swapping modules rather than translating the kernels'
    own ops keeps packed CPU weights and ``act_bits`` plumbing out of the graph, lets the
    weight be stored pre-transposed (no ``Transpose`` node), and makes both exporters produce
    the same nodes. Inputs and outputs are flattened to tensors by a wrapper module, so dict
    inputs and ``ModelOutput`` results export the same way through either exporter.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import secrets
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from pycompress import _optional, _utils

__all__ = ["export_onnx", "verify_onnx", "OnnxVerificationError", "INT8_FORMATS"]

INT8_FORMATS = ("auto", "u8u8", "u8s8", "s8s8", "contrib", "contrib-u8u8", "contrib-u8s8", "contrib-s8s8", "standard",
                "qdq", "exact")
_FORMAT_CODE = {name: i for i, name in enumerate(INT8_FORMATS)}
# the default opset: ATTENTION_OPSET (the standard fused Attention) where the exporter, onnx and
# onnxruntime have it, else DEFAULT_OPSET
DEFAULT_OPSET = 18
ATTENTION_OPSET = 23
MIN_OPSET = 15
TORCHSCRIPT_MAX_OPSET = 20
ATTENTION_FORMS = ("fused", "exporter")
# verification (see export_onnx): ONNX Runtime's distance from the PyTorch model may be at most
# VERIFY_RATIO x the PyTorch model's own distance from its float version (two independent
# roundings of the same activations are sqrt(2) x one apart), plus VERIFY_FLOAT_TOL x its norm
# for the float arithmetic of the two engines
VERIFY_RATIO = 2.0
VERIFY_FLOAT_TOL = 1e-4
# embedding tables with at least this many elements are stored int8 (per row) by default
EMBEDDING_MIN_ELEMENTS = 16384
# absmax floor of the per-token quantization: keeps the scale non-zero for all-zero rows
# (they quantize to 0, as in the PyTorch kernel)
_TINY = 1e-30



class OnnxVerificationError(ValueError):
    """The exported file's outputs in ONNX Runtime disagree with the PyTorch model's."""


# --------------------------------------------------------------------------- optional imports


def _require(name: str):
    return _optional.require(name, "export_onnx", extra="onnx")


# --------------------------------------------------------------------------- custom ops

_OPS_DEFINED = False


def _signed(w: torch.Tensor) -> torch.Tensor:
    """int8 weight from its stored form (uint8 = int8 + 128 for the u8u8 forms)."""
    return (w.to(torch.int16) - 128).to(torch.int8) if w.dtype == torch.uint8 else w


def _define_ops() -> None:
    """Defines ``torch.ops.pycompress_onnx.{int8_linear,w8a16_linear}`` once (export only)."""
    global _OPS_DEFINED
    if _OPS_DEFINED:
        return
    import pycompress.ops as pops

    @torch.library.custom_op("pycompress_onnx::int8_linear", mutates_args=())
    def int8_linear(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor,
                    bias: Optional[torch.Tensor], act_bits: int, fmt: int, k: int) -> torch.Tensor:
        return pops.int8_linear(x, _signed(w_t).t().contiguous(), w_scale, bias, act_bits=act_bits)

    @int8_linear.register_fake
    def _(x, w_t, w_scale, bias, act_bits, fmt, k):
        return x.new_empty((*x.shape[:-1], w_t.shape[1]))

    @torch.library.custom_op("pycompress_onnx::w8a16_linear", mutates_args=())
    def w8a16_linear(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
        return pops.int8_linear_w8a16(x, w_t.t().contiguous(), w_scale, bias)

    @w8a16_linear.register_fake
    def _(x, w_t, w_scale, bias):
        return x.new_empty((*x.shape[:-1], w_t.shape[1]))

    @torch.library.custom_op("pycompress_onnx::int8_embedding", mutates_args=())
    def int8_embedding(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return _dequantize_rows(weight, scale)[ids]

    @int8_embedding.register_fake
    def _(ids, weight, scale):
        return scale.new_empty((*ids.shape, weight.shape[1]))

    @torch.library.custom_op("pycompress_onnx::int8_conv2d", mutates_args=())
    def int8_conv2d(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    in_scale: Optional[torch.Tensor], in_zp: Optional[torch.Tensor],
                    out_scale: Optional[torch.Tensor], out_zp: Optional[torch.Tensor],
                    params: list[int], act: int, fmt: int, residual: Optional[torch.Tensor] = None,
                    sum_scale: Optional[torch.Tensor] = None, sum_zp: Optional[torch.Tensor] = None,
                    res_scale: Optional[torch.Tensor] = None, res_zp: Optional[torch.Tensor] = None) -> torch.Tensor:
        # residual: the block's residual, added before the activation (a float tensor here: the
        # file passes every requantized activation on dequantized). sum_scale / sum_zp: the
        # quantization of conv + bias before the residual in the "qdq" form, res_scale / res_zp
        # the residual's own (the file's only; this reference computes the PyTorch op)
        stride, padding, dilation, groups = params[0:2], params[2:6], params[6:8], params[8]
        out_dtype = torch.uint8 if out_scale is not None else None
        res = () if residual is None else (residual.float(), 1.0, 0)
        y = torch.ops.pycompress.int8_conv2d(
            x, None if in_scale is None else in_scale.reshape(1), None if in_zp is None else in_zp.reshape(1), _signed(w), w_scale.reshape(-1), None if bias is None else bias.reshape(-1),
            None, stride, padding, dilation, groups, _CONV_ACTIVATIONS[act], out_dtype,
            float(out_scale) if out_scale is not None else 1.0, int(out_zp) if out_zp is not None else 0, *res)
        if out_scale is not None:  # the file dequantizes uint8 outputs (QuantizeLinear -> DequantizeLinear)
            y = (y.float() - out_zp.float()) * out_scale
        return y.float().contiguous()

    @int8_conv2d.register_fake
    def _(x, w, w_scale, bias, in_scale, in_zp, out_scale, out_zp, params, act, fmt, residual=None,
          sum_scale=None, sum_zp=None, res_scale=None, res_zp=None):
        (sh, sw), (pt, pb, pl, pr), (dh, dw) = params[0:2], params[2:6], params[6:8]
        kh, kw = w.shape[2], w.shape[3]
        ho = (x.shape[2] + pt + pb - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] + pl + pr - dw * (kw - 1) - 1) // sw + 1
        return x.new_empty((x.shape[0], w.shape[0], ho, wo), dtype=torch.float32)

    _OPS_DEFINED = True


_CONV_ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish")
# The conv form that ONNX Runtime fuses into QLinearConv (DequantizeLinear around Conv, see
# _emit_qdq_conv2d), which int8_format="qdq" picks for the layers that allow it.
_CONV_QDQ = _FORMAT_CODE["qdq"]


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (scale = absmax / 127, round half to even; 1 for all-zero rows)."""
    w = w.detach().float().cpu()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def _dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


class _ExportInt8Embedding(nn.Module):
    """Export-only stand-in for an ``nn.Embedding`` whose table is stored int8 per row."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        q, scale = _quantize_rows(emb.weight)
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", scale.contiguous())

    def forward(self, ids):
        return torch.ops.pycompress_onnx.int8_embedding(ids, self.weight_q, self.weight_scale)


class _ExportInt8Linear(nn.Module):
    """Export-only stand-in for ``Int8Linear``: buffers as stored in the ONNX file."""

    def __init__(self, layer: nn.Module, fmt: str) -> None:
        super().__init__()
        self.mode = layer.mode
        self.act_bits = int(getattr(layer, "act_bits", 8))
        # weights within [-64, 64] (weight_bits=7): u8 x s8 pair sums stay below 2 * 255 * 64
        narrow = self.mode == "w8a8" and int(layer.weight.detach().to(torch.int16).abs().max()) <= 64
        fmt = _resolve_format(fmt, self.act_bits, narrow)
        self.fmt = _FORMAT_CODE[fmt]
        # [in, out]: MatMulInteger / MatMul take B as [K, N]
        w_t = layer.weight.detach().t().contiguous().cpu()
        if self.mode == "w8a8" and fmt.endswith("u8u8"):
            w_t = (w_t.to(torch.int16) + 128).to(torch.uint8)  # same integers, zero point 128
        self.register_buffer("weight_t", w_t)
        self.register_buffer("weight_scale", layer.weight_scale.detach().float().cpu().contiguous())
        if layer.bias is not None:
            self.register_buffer("bias", layer.bias.detach().float().cpu().contiguous())
        else:
            self.bias = None

    def forward(self, x):
        if x.dtype != torch.float32:
            x = x.float()
        if self.mode == "w8a16":
            return torch.ops.pycompress_onnx.w8a16_linear(x, self.weight_t, self.weight_scale, self.bias)
        return torch.ops.pycompress_onnx.int8_linear(x, self.weight_t, self.weight_scale, self.bias,
                                                    self.act_bits, self.fmt, self.weight_t.shape[0])


def _qdq_conv_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The int8 weight and its per-channel scale for the QLinearConv form, or None when ONNX
    Runtime cannot run the layer as one QLinearConv. That needs a calibrated uint8 input, an
    activation that the output's quantization clamps (none, ReLU, ReLU6), a bias with an int32
    form at the sums' scale input_scale * w_scale, and a requantized uint8 output, or a residual
    that arrives as uint8 with its own scale: the conv's part of the sum is then quantized
    (``_qdq_sum_quantization``) and the output may be float.
    A channel whose weight scale is too small for its bias there (a channel with next to no
    weights, as BatchNorm folding leaves in some pretrained networks) gets the smallest scale
    that holds the bias, and its weights rounded to it: they change by less than that scale."""
    if (layer.input_scale is None or layer.activation not in ("none", "relu", "relu6")
            or (layer.residual and _qdq_sum_quantization(layer) is None)
            or (layer.output_scale is None and not layer.residual)):
        return None
    w = layer.weight.detach().cpu()
    ws = layer.weight_scale.detach().double().cpu().reshape(-1)
    xs = float(layer.input_scale)
    if not (math.isfinite(xs) and xs > 0) or not bool(torch.isfinite(ws).all()) or bool((ws < 0).any()):
        return None
    bias = layer.bias.detach().double().cpu().reshape(-1) if layer.bias is not None else torch.zeros_like(ws)
    if not bool(torch.isfinite(bias).all()):
        return None
    need = bias.abs() / (xs * 2.0 ** 30)  # the bias within +-2^30 of the sums' units (float32 margin)
    low = (ws < need) | (ws == 0)
    if bool(low.any()):
        new = torch.where(need > 0, need, torch.ones_like(need))
        ratio = torch.where(low, ws / new, torch.ones_like(ws)).reshape(-1, *([1] * (w.dim() - 1)))
        w = torch.where(low.reshape(ratio.shape), (w.double() * ratio).round().clamp(-127, 127), w.double()).to(torch.int8)
        ws = torch.where(low, new, ws)
    return w, ws.float()


def _qdq_sum_quantization(layer: nn.Module) -> tuple[float, int] | None:
    """The uint8 quantization (scale, zero point) of ``conv + bias`` before the residual addition
    in the QLinearConv form of a residual layer, or None when the residual has no static uint8
    quantization. ONNX Runtime's fused conv writes 8 bits, so the sum before the residual gets a
    quantization of its own. With the residual within [r_lo, r_hi] and the output's
    quantization clamping the activation's result to [o_lo, o_hi], a sum below o_lo - r_hi or
    above o_hi - r_lo gives the output it gives at that bound, so clamping to
    [o_lo - r_hi, o_hi - r_lo] changes nothing; its step is the output's and the residual's steps
    added (about twice the output's step in a ResNet block). The range calibration recorded
    (``Int8Conv2d.sum_scale``), cut to that interval, is used where there is one: about half
    that step on ResNets and MobileNetV2. A float output bounds nothing: such a layer needs the
    calibrated range."""
    if layer._buffers.get("residual_scale") is None:
        return None
    lo, hi = -math.inf, math.inf
    if layer.output_scale is not None:
        rs, rz = float(layer.residual_scale.reshape(-1)[0]), int(layer.residual_zero_point.reshape(-1)[0])
        os_, oz = float(layer.output_scale.reshape(-1)[0]), int(layer.output_zero_point.reshape(-1)[0])
        if not all(math.isfinite(v) and v > 0 for v in (rs, os_)):
            return None
        o_lo, o_hi = (0 - oz) * os_, (255 - oz) * os_
        if layer.activation in ("relu", "relu6"):  # every sum <= 0 gives 0
            o_lo = max(o_lo, 0.0)
        if layer.activation == "relu6":
            o_hi = min(o_hi, 6.0)
        lo, hi = o_lo - (255 - rz) * rs, o_hi - (0 - rz) * rs
    if layer._buffers.get("sum_scale") is not None:
        ss, sz = float(layer.sum_scale.reshape(-1)[0]), int(layer.sum_zero_point.reshape(-1)[0])
        if math.isfinite(ss) and ss > 0:
            lo, hi = max(lo, (0 - sz) * ss), min(hi, (255 - sz) * ss)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # a float output and no calibrated range
        return None
    # uint8 steps whose grid covers [lo, hi] (and 0) whole: 254 steps for the span, so that the
    # zero point rounded up still leaves room for hi
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32((hi - lo) / 254.0 * (1.0 + 1e-6)))
    if not (math.isfinite(scale) and scale > 0):
        return None
    return scale, int(min(max(math.ceil(-lo / scale), 0), 255))


class _ExportInt8Conv2d(nn.Module):
    """Export-only stand-in for ``Int8Conv2d``: buffers as stored in the ONNX file (scales and
    bias as ``[1, C, 1, 1]``; the weight uint8 = int8 + 128 for the u8u8 form)."""

    def __init__(self, layer: nn.Module, fmt: str) -> None:
        super().__init__()
        w = layer.weight.detach().cpu()
        qdq = _qdq_conv_weights(layer) if fmt in ("auto", "qdq") else None
        w_scale = layer.weight_scale.detach().float().cpu()
        if qdq is not None:
            # the QLinearConv form keeps int8 weights (ONNX Runtime's fast u8 x s8 kernels)
            w, w_scale = qdq
            self.fmt = _CONV_QDQ
            kind = "u8s8"
        else:
            # ConvInteger takes uint8 activations. ONNX Runtime runs its fast kernel for uint8
            # weights only (int8 weights take a path several times slower), and u8 x u8 is exact
            # on every CPU: the default and standard forms store uint8 = int8 + 128 with zero
            # point 128; a form that names int8 weights (u8s8, s8s8, contrib) gets them.
            kind = "u8u8" if fmt in ("auto", "standard", "qdq", "exact") else _resolve_format(fmt, 8, False).split("-")[-1]
            self.fmt = _FORMAT_CODE["u8u8" if kind == "u8u8" else "u8s8"]
        if kind == "u8u8":
            w = (w.to(torch.int16) + 128).to(torch.uint8)
        self.register_buffer("weight", w.contiguous())
        self.register_buffer("weight_scale", w_scale.reshape(1, -1, 1, 1).contiguous())
        self.register_buffer("bias", None if layer.bias is None
                             else layer.bias.detach().float().cpu().reshape(1, -1, 1, 1).contiguous())
        for name in ("input_scale", "input_zero_point", "output_scale", "output_zero_point"):
            v = getattr(layer, name)
            self.register_buffer(name, None if v is None else v.detach().cpu().reshape(()).clone())  # scalars
        # stride, padding (top, bottom, left, right), dilation, groups
        self.params = [*layer.stride, *layer.padding4, *layer.dilation, int(layer.groups)]
        self.act = _CONV_ACTIVATIONS.index(layer.activation)
        sum_q = _qdq_sum_quantization(layer) if qdq is not None and layer.residual else None
        self.register_buffer("sum_scale", None if sum_q is None else torch.tensor(sum_q[0], dtype=torch.float32))
        self.register_buffer("sum_zero_point", None if sum_q is None else torch.tensor(sum_q[1], dtype=torch.int32))
        for name in ("residual_scale", "residual_zero_point"):
            v = getattr(layer, name) if sum_q is not None else None
            self.register_buffer(name, None if v is None else v.detach().cpu().reshape(()).clone())

    def forward(self, x, residual=None):
        if x.dtype != torch.float32:
            x = x.float()
        if residual is not None:
            if residual.dtype != torch.float32:
                residual = residual.float()
            if residual.shape[0] != x.shape[0] or residual.shape[1] != self.weight.shape[0]:
                raise ValueError(f"the residual of shape {tuple(residual.shape)} does not fit the conv's output")
        return torch.ops.pycompress_onnx.int8_conv2d(
            x, self.weight, self.weight_scale, self.bias, self.input_scale, self.input_zero_point,
            self.output_scale, self.output_zero_point, self.params, self.act, self.fmt, residual,
            self.sum_scale, self.sum_zero_point, self.residual_scale, self.residual_zero_point)


# --------------------------------------------------------------------------- graph builders


class _Builder:
    """Emits ONNX nodes; subclasses adapt to onnxscript (torch.export path) or TorchScript."""

    opset: int

    def op(self, name: str, *inputs, domain: str = "", **attrs):
        raise NotImplementedError

    def const(self, array: np.ndarray):
        raise NotImplementedError

    def dims(self, value) -> list | None:
        """``value``'s shape as the exporter knows it: ints, names of symbolic sizes or None per
        dimension; None when its rank is unknown."""
        return None

    def is_bool(self, value) -> bool:
        return False

    def none(self):
        """An omitted optional input."""
        return None

    def reduce_last(self, x, op: str, keepdims: int = 1):
        if self.opset >= 18:
            return self.op(op, x, self.const(np.array([-1], np.int64)), keepdims=keepdims)
        return self.op(op, x, axes=[-1], keepdims=keepdims)


class _ScriptBuilder(_Builder):
    def __init__(self, opset: int):
        from onnxscript import values

        self.opset = opset
        self._domains = {"": values.Opset("", opset), "com.microsoft": values.Opset("com.microsoft", 1)}

    def op(self, name, *inputs, domain="", **attrs):
        if domain:  # the onnx package has no schema for ONNX Runtime's contrib ops
            from onnxscript import values

            return values.Op(self._domains[domain], name, _contrib_schema(name))(*inputs, **attrs)
        return getattr(self._domains[domain], name)(*inputs, **attrs)

    def const(self, array):
        import onnx.numpy_helper

        return self._domains[""].Constant(value=onnx.numpy_helper.from_array(np.asarray(array)))

    def dims(self, value):
        shape = getattr(value, "shape", None)
        if shape is None:
            return None
        out = []
        for d in shape:
            if isinstance(d, int):
                out.append(d)
            else:
                name = getattr(d, "value", None)
                out.append(name if isinstance(name, (int, str)) else None)
        return out

    def is_bool(self, value):
        from onnxscript import ir

        return getattr(value, "dtype", None) == ir.DataType.BOOL


def _contrib_schema(name: str):
    """An ``onnx.defs.OpSchema`` for the ONNX Runtime ops the export writes
    (``com.microsoft.MatMulIntegerToFloat``, ``com.microsoft.MultiHeadAttention``)."""
    if name not in ("MatMulIntegerToFloat", "MultiHeadAttention"):
        raise ValueError(f"no schema for com.microsoft.{name}")
    from onnx.defs import OpSchema

    opt = OpSchema.FormalParameterOption.Optional
    P = OpSchema.FormalParameter
    if name == "MultiHeadAttention":
        return OpSchema(
            "MultiHeadAttention", "com.microsoft", 1,
            inputs=[P("query", "T"), P("key", "T", param_option=opt), P("value", "T", param_option=opt),
                    P("bias", "T", param_option=opt), P("key_padding_mask", "M", param_option=opt),
                    P("attention_bias", "T", param_option=opt)],
            outputs=[P("output", "T")],
            type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
            attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                        OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False)],
        )
    return OpSchema(
        "MatMulIntegerToFloat", "com.microsoft", 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("a_scale", "T3"), P("b_scale", "T3"),
                P("a_zero_point", "T1", param_option=opt), P("b_zero_point", "T2", param_option=opt),
                P("bias", "T3", param_option=opt)],
        outputs=[P("Y", "T3")],
        type_constraints=[("T1", ["tensor(int8)", "tensor(uint8)"], ""),
                          ("T2", ["tensor(int8)", "tensor(uint8)"], ""),
                          ("T3", ["tensor(float)"], "")],
    )


class _TorchScriptBuilder(_Builder):
    def __init__(self, g, opset: int):
        self.g = g
        self.opset = opset

    def op(self, name, *inputs, domain="", **attrs):
        kw = {}
        for k, v in attrs.items():
            if isinstance(v, bool) or isinstance(v, int):
                kw[k + "_i"] = int(v)
            elif isinstance(v, float):
                kw[k + "_f"] = v
            elif isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v):
                kw[k + "_i"] = list(v)
            else:
                raise TypeError(f"unsupported attribute {k}={v!r}")
        full = f"{domain}::{name}" if domain else name
        return self.g.op(full, *inputs, **kw)

    def const(self, array):
        return self.g.op("Constant", value_t=torch.from_numpy(np.array(array)))

    def dims(self, value):
        from torch.onnx import symbolic_helper

        try:
            sizes = symbolic_helper._get_tensor_sizes(value)
        except Exception:  # noqa: BLE001 (no tensor type recorded)
            return None
        return None if sizes is None else [d if isinstance(d, int) else None for d in sizes]

    def is_bool(self, value):
        try:
            return value.type().scalarType() == "Bool"
        except Exception:  # noqa: BLE001
            return False

    def none(self):
        from torch.onnx import symbolic_helper

        return symbolic_helper._optional_input_placeholder_tensor(self.g)


def _resolve_format(fmt: str, act_bits: int, narrow: bool = False) -> str:
    """``auto`` / ``contrib`` / ``standard`` -> the concrete form of this layer (``narrow``: every
    weight in [-64, 64])."""
    # u8 activations x s8 weights run ONNX Runtime's fastest x86 kernels (VNNI / AMX, and
    # vpmaddubsw on AVX2). They are exact wherever the CPU has VNNI or AMX; on AVX2 alone the
    # int16 pair sums of vpmaddubsw stay exact only for 7-bit activations (shifted values
    # <= 127) or weights within [-64, 64] (2 * 255 * 64 < 32768)
    if fmt in ("auto", "qdq", "exact"):  # conv forms: the linear layers take the default
        return "contrib-u8s8"
    if fmt == "contrib":
        return "contrib-u8s8"
    if fmt == "standard":
        # standard operators only: u8 x u8 keeps 8-bit x 8-bit products exact on every CPU
        return "u8s8" if act_bits == 7 or narrow else "u8u8"
    return fmt


def _emit_int8_linear(b: _Builder, x, w_t, w_scale, bias, act_bits: int, fmt: int, k: int):
    """Per-token symmetric quantization + integer matmul + dequantization (see module doc).

    ``w_t`` is the int8 weight ``[K, N]`` for the s8-weight forms and the uint8 weight + 128
    for the u8-weight forms (``_ExportInt8Linear`` stores it that way).
    """
    name = INT8_FORMATS[fmt]
    contrib = name.startswith("contrib")
    kind = name.split("-")[1] if contrib else name
    qmax = 127.0 if act_bits == 8 else 63.0
    # tokens as rows: [..., K] -> [M, K] (Reshape is copy-free in ONNX Runtime)
    x2 = b.op("Reshape", x, b.const(np.array([-1, k], np.int64)))
    # absmax = max(max(x), -min(x)): two reading passes, no |x| tensor written
    absmax = b.op("Max", b.reduce_last(x2, "ReduceMax"), b.op("Neg", b.reduce_last(x2, "ReduceMin")),
                  b.const(np.array(_TINY, np.float32)))                       # [M, 1]
    x_scale = b.op("Div", absmax, b.const(np.array(qmax, np.float32)))       # [M, 1]
    x_scale1 = b.op("Reshape", x_scale, b.const(np.array([-1], np.int64)))   # [M]
    zp = 0 if kind == "s8s8" else (128 if act_bits == 8 else 64)
    zero = b.op("Expand", b.const(np.array([zp], np.int8 if kind == "s8s8" else np.uint8)), b.op("Shape", x_scale1))
    # per-token (axis 0) QuantizeLinear: round half to even of x / x_scale, + zero point, saturated
    xq = b.op("QuantizeLinear", x2, x_scale1, zero, axis=0)
    a_zp = [] if kind == "s8s8" else [b.const(np.array(zp, np.uint8))]
    b_zp = [b.const(np.array(128, np.uint8))] if kind == "u8u8" else []
    if contrib:
        # com.microsoft.MatMulIntegerToFloat: the integer product, times w_scale per column in
        # the GEMM's output stage, times the [M, 1] per-token scale in a second pass inside the
        # same operator. Its bias input is added before that per-token scaling, so the bias is a
        # separate Add (below)
        y = b.op("MatMulIntegerToFloat", xq, w_t, x_scale, w_scale, *a_zp, *b_zp, domain="com.microsoft")
    else:
        acc = b.op("MatMulInteger", xq, w_t, *a_zp, *b_zp)                    # int32 [M, N]
        # (acc * x_scale[m]) * w_scale[n]: the int32 -> float cast and the per-token scale in one op
        y = b.op("Mul", b.op("DequantizeLinear", acc, x_scale1, axis=0), w_scale)
    lead = b.op("Slice", b.op("Shape", x), b.const(np.array([0], np.int64)), b.const(np.array([-1], np.int64)))
    out_shape = b.op("Concat", lead, b.const(np.array([-1], np.int64)), axis=0)
    y = b.op("Reshape", y, out_shape)
    if bias is not None:
        y = b.op("Add", y, bias)
    return y


def _emit_int8_embedding(b: _Builder, ids, weight, scale):
    """Embedding rows stored int8 with one fp32 scale per row: ``Gather`` of both, ``Cast``,
    ``Mul`` — the same fp32 products as the dequantized table in PyTorch."""
    rows = b.op("Cast", b.op("Gather", weight, ids, axis=0), to=1)           # float32 [..., H]
    s = b.op("Unsqueeze", b.op("Gather", scale, ids, axis=0), b.const(np.array([-1], np.int64)))
    return b.op("Mul", rows, s)


def _emit_w8a16_linear(b: _Builder, x, w_t, w_scale, bias):
    w = b.op("DequantizeLinear", w_t, w_scale, axis=1)
    y = b.op("MatMul", x, w)
    if bias is not None:
        y = b.op("Add", y, bias)
    return y


def _emit_attention(b: _Builder, q, k, v, mask, is_causal: bool, scale: float | None, contrib: bool):
    """``scaled_dot_product_attention`` as one fused node, or None where the call has no fused
    form here (the caller then writes the exporter's own decomposition).

    Opset >= 23: the standard ``Attention``; below, with ``contrib``, ONNX Runtime's
    ``com.microsoft.MultiHeadAttention``. Both run in one kernel what the decomposition writes
    as ``MatMul``, ``Softmax``, the mask's ``Where`` / ``Add``, the ``IsNaN`` guard of fully
    masked rows and their transposes. Query, key and value ``[B, H, S, D]`` are handed over in
    the 3-D layout ``[B, S, H * D]`` (``Transpose`` + ``Reshape``) and the output is turned back
    to ``[B, H, S, Dv]``; these transposes undo the model's own head split and merge, and ONNX
    Runtime cancels each pair, so the attention reads and writes the projections' layout.
    """
    qd, kd, vd = b.dims(q), b.dims(k), b.dims(v)
    if not (qd and kd and vd and len(qd) == len(kd) == len(vd) == 4):
        return None
    hq, hk, d, dv = qd[1], kd[1], qd[3], vd[3]
    if not all(isinstance(x, int) and x > 0 for x in (hq, hk, d, dv)) or vd[1] != hk or kd[3] != d:
        return None
    standard = b.opset >= 23
    if not standard and not contrib:
        return None
    if hq != hk and (not standard or hq % hk):
        return None  # grouped-query attention: the standard op only
    if is_causal and (not standard or mask is not None or qd[2] is None or qd[2] != kd[2]):
        # the standard op only (MultiHeadAttention gets no causal form here), and it aligns the
        # causal mask like torch only for as many queries as keys
        return None
    i64 = lambda a: b.const(np.array(a, np.int64))  # noqa: E731
    if mask is not None:
        boolean = b.is_bool(mask)
        if not standard and boolean:
            # attention_bias is additive: masked positions get the lowest float (not -inf,
            # which ONNX Runtime's softmax would turn into NaN)
            mask = b.op("Where", mask, b.const(np.array(0.0, np.float32)),
                        b.const(np.array(np.finfo(np.float32).min, np.float32)))
        md = b.dims(mask)
        if not (md and len(md) == 4 and md[2] is not None and md[2] == qd[2] and md[3] is not None
                and md[3] == kd[2]):
            # ONNX Runtime wants the mask's last two sizes spelled out: broadcast to [.., Sq, Skv]
            sizes = b.op("Concat", i64([1, 1]), b.op("Shape", q, start=2, end=3), b.op("Shape", k, start=2, end=3),
                         axis=0)
            if standard:
                mask = b.op("Expand", mask, sizes)
            else:  # a float bias: + zeros of that shape (the TorchScript exporter's shape check
                # rejects an Expand of the mask itself)
                mask = b.op("Add", mask, b.op("Expand", b.const(np.array(0.0, np.float32)), sizes))

    def to3(x):
        return b.op("Reshape", b.op("Transpose", x, perm=[0, 2, 1, 3]), i64([0, 0, -1]))

    attrs = {} if scale is None else {"scale": float(scale)}
    if standard:
        if is_causal:
            attrs["is_causal"] = 1
        inputs = [to3(q), to3(k), to3(v)] + ([mask] if mask is not None else [])
        o = b.op("Attention", *inputs, q_num_heads=hq, kv_num_heads=hk, **attrs)
    else:
        extra = [b.none(), b.none(), mask] if mask is not None else []
        o = b.op("MultiHeadAttention", to3(q), to3(k), to3(v), *extra, num_heads=hq, domain="com.microsoft",
                 **attrs)
    if isinstance(o, (tuple, list)):  # onnxscript returns every declared output
        o = o[0]
    return b.op("Transpose", b.op("Reshape", o, i64([0, 0, hq, dv])), perm=[0, 2, 1, 3])


def _scalar_value(name: str, consts: dict) -> float | None:
    a = consts.get(name)
    return float(a.reshape(())) if a is not None and a.size == 1 and a.dtype.kind == "f" else None


def _reorder_gelu(graph) -> int:
    """Rewrites the exact GELU as the torch.export-based exporter writes it,
    ``x * (0.5 * (1 + erf(x / sqrt(2))))``, as ``(x * 0.5) * (1 + erf(x / sqrt(2)))``: the same
    products (halving a normal float is exact) in the order ONNX Runtime's ``GeluFusion`` recognizes, so that its
    five element-wise passes become one ``Gelu`` kernel (``BiasGelu`` with a preceding bias
    ``Add``). Returns the number of rewritten GELUs."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and not n.domain and len(n.attribute) == 1:
            a = n.attribute[0]
            if a.name == "value":
                consts[n.output[0]] = numpy_helper.to_array(a.t)
            elif a.name == "value_float":
                consts[n.output[0]] = np.array(a.f, np.float32)
    producer = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in graph.output:
        uses[o.name] = uses.get(o.name, 0) + 1

    def near(name, value):
        v = _scalar_value(name, consts)
        return v is not None and abs(v - value) <= 1e-6 * abs(value)

    def made_by(name, op):
        n = producer.get(name)
        return n if n is not None and n.op_type == op and not n.domain else None

    count = 0
    for outer in graph.node:
        if outer.op_type != "Mul" or outer.domain or len(outer.input) != 2:
            continue
        for xi in (0, 1):
            x, inner = outer.input[xi], made_by(outer.input[1 - xi], "Mul")
            if inner is None or uses.get(inner.output[0]) != 1:
                continue
            hi = 0 if near(inner.input[0], 0.5) else 1 if near(inner.input[1], 0.5) else None
            add = None if hi is None else made_by(inner.input[1 - hi], "Add")
            if add is None:
                continue
            ei = 0 if near(add.input[1], 1.0) else 1 if near(add.input[0], 1.0) else None
            erf = None if ei is None else made_by(add.input[ei], "Erf")
            div = None if erf is None else made_by(erf.input[0], "Div")
            if div is None or div.input[0] != x or not near(div.input[1], float(np.sqrt(2.0))):
                continue
            half, add_out = inner.input[hi], add.output[0]
            inner.input[:] = [x, half]                    # x * 0.5
            outer.input[:] = [inner.output[0], add_out]   # (x * 0.5) * (1 + erf(x / sqrt(2)))
            count += 1
            break
    return count


def _hide_int8_linear_shapes(graph) -> int:
    """Drops the recorded shapes (``value_info``) of the values the int8 linear layers' nodes
    produce; returns how many.

    ONNX Runtime fuses a residual ``Add`` (and a bias ``Add`` before it) with the
    ``LayerNormalization`` after it into ``SkipLayerNormalization``, and a bias ``Add`` with a
    following ``Gelu`` into ``BiasGelu``, where the shapes of the ``Add``'s inputs are known. Its
    CPU kernels for both are slower than the unfused operators (ONNX Runtime 1.32:
    ``SkipLayerNormalization`` normalizes with a scalar loop and a division per element).
    Without recorded shapes, ONNX Runtime cannot infer those of the layer's output (a
    ``Reshape`` to a computed shape) and leaves the operators unfused. The exporter records the
    shapes the torch.export graph knows; TorchScript exports record none for these nodes."""
    made_by_linear = set()
    for node in graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.fx_node" and "pycompress_onnx.int8_linear." in prop.value:
                made_by_linear.update(node.output)
                break
    keep = [v for v in graph.value_info if v.name not in made_by_linear]
    dropped = len(graph.value_info) - len(keep)
    if dropped:
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return dropped


def _reduce_chw(b: _Builder, x, op: str):
    """``op`` over the C, H, W axes of ``x`` [N, C, H, W] -> [N]."""
    if b.opset >= 18:
        return b.op(op, x, b.const(np.array([1, 2, 3], np.int64)), keepdims=0)
    return b.op(op, x, axes=[1, 2, 3], keepdims=0)


def _emit_int8_conv2d(b: _Builder, x, w, w_scale, bias, in_scale, in_zp, out_scale, out_zp,
                      params, act: int, fmt: int, residual=None, sum_scale=None, sum_zp=None,
                      res_scale=None, res_zp=None):
    """Quantization to uint8 + ``ConvInteger`` + the op's fp32 epilogue (see the module doc)."""
    stride, padding, dilation, groups = list(params[0:2]), list(params[2:6]), list(params[6:8]), int(params[8])
    top, bottom, left, right = padding  # ONNX pads: [top, left, bottom, right]
    conv_attrs = dict(strides=stride, pads=[top, left, bottom, right], dilations=dilation, group=groups)
    f32, i32, u8 = 1, 6, 2
    if fmt == _CONV_QDQ:
        return _emit_qdq_conv2d(b, x, w, w_scale, bias, in_scale, in_zp, out_scale, out_zp, conv_attrs, act,
                                residual, sum_scale, sum_zp, res_scale, res_zp)
    w_zp = [b.const(np.array(128, np.uint8))] if INT8_FORMATS[fmt] == "u8u8" else []
    if in_scale is not None:
        # static: one scale and zero point; ConvInteger pads with the zero point (real value 0)
        zp8 = b.op("Cast", in_zp, to=u8)
        xq = _quantize_as_the_op(b, x, in_scale, zp8)
        acc = b.op("ConvInteger", xq, w, zp8, *w_zp, **conv_attrs)
        y = b.op("Mul", b.op("Cast", acc, to=f32), in_scale)
    else:
        # dynamic, per image as the PyTorch op: scale = (hi - lo) / 255 over [min(0, min x),
        # max(0, max x)], zp = clamp(round(-lo / scale), 0, 255). ConvInteger takes one zero point
        # per tensor, so the images are convolved with zero point 0 and zp[n] x (the weights'
        # sum over each window's in-image positions) is subtracted: the same exact int32 sums
        zero = b.const(np.array(0.0, np.float32))
        lo = b.op("Min", _reduce_chw(b, x, "ReduceMin"), zero)
        hi = b.op("Max", _reduce_chw(b, x, "ReduceMax"), zero)
        scale = b.op("Div", b.op("Sub", hi, lo), b.const(np.array(255.0, np.float32)))
        scale = b.op("Where", b.op("Equal", hi, lo), b.const(np.array(1.0, np.float32)), scale)    # [N]
        zpf = b.op("Clip", b.op("Round", b.op("Div", b.op("Neg", lo), scale)), zero,
                   b.const(np.array(255.0, np.float32)))
        zp8 = b.op("Cast", zpf, to=u8)                                                          # [N]
        xq = b.op("QuantizeLinear", x, scale, zp8, axis=0)
        u8zero = b.const(np.array(0, np.uint8))
        acc0 = b.op("ConvInteger", xq, w, u8zero, *w_zp, **conv_attrs)
        one_shape = b.op("Concat", b.const(np.array([1], np.int64)),
                         b.op("Slice", b.op("Shape", x), b.const(np.array([1], np.int64)),
                              b.const(np.array([4], np.int64))), axis=0)
        ones = b.op("Expand", b.const(np.array([1], np.uint8)), one_shape)                     # [1, C, H, W]
        wsum = b.op("ConvInteger", ones, w, u8zero, *w_zp, **conv_attrs)                        # [1, Co, Ho, Wo]
        per_image = b.const(np.array([-1, 1, 1, 1], np.int64))
        acc = b.op("Sub", acc0, b.op("Mul", b.op("Reshape", b.op("Cast", zp8, to=i32), per_image), wsum))
        y = b.op("Mul", b.op("Cast", acc, to=f32), b.op("Reshape", scale, per_image))
    y = b.op("Mul", y, w_scale)
    if bias is not None:
        y = b.op("Add", y, bias)
    if residual is not None:  # the block's residual addition, before the activation
        y = b.op("Add", y, residual)
    y = _emit_conv_activation(b, y, act)
    if out_scale is not None:
        # requantized output: the same uint8 values, passed on dequantized (the next layer's
        # QuantizeLinear with the same scale and zero point gives them back exactly)
        zp8 = b.op("Cast", out_zp, to=u8)
        y = b.op("DequantizeLinear", _quantize_as_the_op(b, y, out_scale, zp8), out_scale, zp8)
    return y


def _quantize_as_the_op(b: _Builder, x, scale, zp8):
    """uint8 ``rint(x * (1 / scale)) + zp``, saturated: the static quantization of the PyTorch op,
    which multiplies by the fp32 reciprocal where ``QuantizeLinear`` divides by the scale (a
    value within one float rounding of a tie can land one step apart between the two, and the
    step carries on through the layers after it)."""
    inv = b.op("Div", b.const(np.array(1.0, np.float32)), scale)
    return b.op("QuantizeLinear", b.op("Mul", x, inv), b.const(np.array(1.0, np.float32)), zp8)


def _emit_conv_activation(b: _Builder, y, act: int):
    """The fused activation of an ``Int8Conv2d`` (index into ``_CONV_ACTIVATIONS``)."""
    name = _CONV_ACTIVATIONS[act]
    if name == "relu":
        return b.op("Relu", y)
    if name == "relu6":
        return b.op("Clip", y, b.const(np.array(0.0, np.float32)), b.const(np.array(6.0, np.float32)))
    if name == "silu":
        return b.op("Mul", y, b.op("Sigmoid", y))
    if name == "hardswish":
        return b.op("HardSwish", y)
    return y


def _emit_qdq_conv2d(b: _Builder, x, w, w_scale, bias, in_scale, in_zp, out_scale, out_zp, conv_attrs, act: int,
                     residual=None, sum_scale=None, sum_zp=None, res_scale=None, res_zp=None):
    """The form ONNX Runtime fuses into QLinearConv (layers that ``_qdq_conv_weights`` accepts):
    ``QuantizeLinear → DequantizeLinear`` of the input with its static scale, the int8 weights
    and the int32 bias ``round(bias / (input_scale * w_scale))`` dequantized per output channel,
    ``Conv``, the activation, and ``QuantizeLinear → DequantizeLinear`` with the output's scale.
    The integer sums are the PyTorch op's; the requantization is ONNX Runtime's (one rounding of
    the sum times input_scale * w_scale / output_scale, the bias rounded to the sum's scale), so
    an output can land one step from the PyTorch op's. A residual layer writes
    ``Conv → QuantizeLinear → DequantizeLinear`` with ``sum_scale`` / ``sum_zp``
    (``_qdq_sum_quantization``), then ``Add`` of the residual, itself written as
    ``QuantizeLinear → DequantizeLinear`` with its scale (its values are on that grid: the same
    values, but ONNX Runtime then sees a uint8 residual even where a float operator, a max pool,
    produced it, and runs that operator on uint8 too), the activation and the output's
    ``QuantizeLinear → DequantizeLinear``: ONNX Runtime fuses the conv into QLinearConv and the
    addition into QLinearAdd. That rounds the sum once more than the PyTorch op, which adds the
    residual to the float sum."""
    u8, i32 = 2, 6
    flat = b.const(np.array([-1], np.int64))
    ws = b.op("Reshape", w_scale, flat)                                                     # [C]
    channels = b.op("Shape", ws)
    zp8 = b.op("Cast", in_zp, to=u8)
    xd = b.op("DequantizeLinear", b.op("QuantizeLinear", x, in_scale, zp8), in_scale, zp8)
    wd = b.op("DequantizeLinear", w, ws, b.op("Expand", b.const(np.array([0], np.int8)), channels), axis=0)
    conv_in = [xd, wd]
    if bias is not None:
        acc_scale = b.op("Mul", ws, in_scale)
        bq = b.op("Cast", b.op("Round", b.op("Div", b.op("Reshape", bias, flat), acc_scale)), to=i32)
        conv_in.append(b.op("DequantizeLinear", bq, acc_scale,
                            b.op("Expand", b.const(np.array([0], np.int32)), channels), axis=0))
    y = b.op("Conv", *conv_in, **conv_attrs)
    if residual is not None:
        zs, zr = b.op("Cast", sum_zp, to=u8), b.op("Cast", res_zp, to=u8)
        residual = b.op("DequantizeLinear", b.op("QuantizeLinear", residual, res_scale, zr), res_scale, zr)
        y = b.op("Add", b.op("DequantizeLinear", b.op("QuantizeLinear", y, sum_scale, zs), sum_scale, zs), residual)
    y = _emit_conv_activation(b, y, act)
    if out_scale is None:  # a residual layer with a float output
        return y
    zo = b.op("Cast", out_zp, to=u8)
    return b.op("DequantizeLinear", b.op("QuantizeLinear", y, out_scale, zo), out_scale, zo)


def _translation_table(opset: int, attention: str = "fused", contrib: bool = True) -> dict:
    def int8_linear(x, w_t, w_scale, bias=None, act_bits: int = 8, fmt: int = 0, k: int = 0):
        return _emit_int8_linear(_ScriptBuilder(opset), x, w_t, w_scale, bias, int(act_bits), int(fmt), int(k))

    def w8a16_linear(x, w_t, w_scale, bias=None):
        return _emit_w8a16_linear(_ScriptBuilder(opset), x, w_t, w_scale, bias)

    def int8_embedding(ids, weight, scale):
        return _emit_int8_embedding(_ScriptBuilder(opset), ids, weight, scale)

    def int8_conv2d(x, w, w_scale, bias=None, in_scale=None, in_zp=None, out_scale=None, out_zp=None,
                    params=(), act: int = 0, fmt: int = 0, residual=None, sum_scale=None, sum_zp=None,
                    res_scale=None, res_zp=None):
        return _emit_int8_conv2d(_ScriptBuilder(opset), x, w, w_scale, bias, in_scale, in_zp, out_scale, out_zp,
                                 [int(p) for p in params], int(act), int(fmt), residual=residual,
                                 sum_scale=sum_scale, sum_zp=sum_zp, res_scale=res_scale, res_zp=res_zp)

    fallback = _torchlib_sdpa() if attention == "fused" else None

    def sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
             scale: float | None = None, enable_gqa: bool = False):
        out = None
        if not dropout_p:
            out = _emit_attention(_ScriptBuilder(opset), query, key, value, attn_mask, bool(is_causal),
                                  scale, contrib)
        if out is None:  # the exporter's own decomposition
            out = fallback(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return out

    table = {
        torch.ops.pycompress_onnx.int8_conv2d.default: int8_conv2d,
        torch.ops.pycompress_onnx.int8_linear.default: int8_linear,
        torch.ops.pycompress_onnx.w8a16_linear.default: w8a16_linear,
        torch.ops.pycompress_onnx.int8_embedding.default: int8_embedding,
    }
    if fallback is not None:
        table[torch.ops.aten.scaled_dot_product_attention.default] = sdpa
    return table


def _torchlib_sdpa():
    """onnxscript's own translation of ``scaled_dot_product_attention`` (the fallback of the
    fused form), or None where this onnxscript has none under that name."""
    try:
        from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention
    except ImportError:
        return None
    return aten_scaled_dot_product_attention


def _torchscript_sdpa_symbolic():
    """The TorchScript exporter's symbolic for ``aten::scaled_dot_product_attention``: the fused
    form where it applies (``com.microsoft.MultiHeadAttention``: this exporter stops at opset
    20), else torch's own symbolic."""
    from torch.onnx import symbolic_helper

    try:
        from torch.onnx import symbolic_opset14 as builtin
    except ImportError:  # pragma: no cover - torch versions that moved the module
        from torch.onnx._internal.torchscript_exporter import symbolic_opset14 as builtin

    def sdpa(g, query, key, value, attn_mask=None, dropout_p=None, is_causal=None, scale=None, enable_gqa=None,
             *rest):
        def const(v, kind, default):
            if v is None or symbolic_helper._is_none(v):
                return default
            return symbolic_helper._maybe_get_const(v, kind)

        mask = None if attn_mask is None or symbolic_helper._is_none(attn_mask) else attn_mask
        p, causal, sc = const(dropout_p, "f", 0.0), const(is_causal, "b", False), const(scale, "f", None)
        out = None
        if isinstance(p, float) and not p and isinstance(causal, (bool, int)) and (sc is None or isinstance(sc, float)):
            b = _TorchScriptBuilder(g, int(symbolic_helper.GLOBALS.export_onnx_opset_version))
            out = _emit_attention(b, query, key, value, mask, bool(causal), sc, contrib=True)
        if out is None:
            args = [query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *rest]
            while args and args[-1] is None:
                args.pop()
            out = builtin.scaled_dot_product_attention(g, *args)
        return out

    return sdpa


_SYMBOLICS_REGISTERED = False


@contextlib.contextmanager
def _sdpa_symbolic(fused: bool):
    """Registers the fused attention symbolic (``MultiHeadAttention``, a contrib op) for one
    TorchScript export where ``fused`` (and removes it after, so that other ``torch.onnx.export``
    calls in the process keep torch's own)."""
    if not fused:
        yield
        return
    name, version = "aten::scaled_dot_product_attention", 14
    torch.onnx.register_custom_op_symbolic(name, _torchscript_sdpa_symbolic(), version)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(name, version)


def _register_symbolics() -> None:
    global _SYMBOLICS_REGISTERED
    if _SYMBOLICS_REGISTERED:
        return
    from torch.onnx import symbolic_helper

    def _opt(v):
        return None if symbolic_helper._is_none(v) else v

    def _opset():
        return int(symbolic_helper.GLOBALS.export_onnx_opset_version)

    @symbolic_helper.parse_args("v", "v", "v", "v", "i", "i", "i")
    def int8_linear(g, x, w_t, w_scale, bias, act_bits, fmt, k):
        return _emit_int8_linear(_TorchScriptBuilder(g, _opset()), x, w_t, w_scale, _opt(bias), act_bits, fmt, k)

    @symbolic_helper.parse_args("v", "v", "v", "v")
    def w8a16_linear(g, x, w_t, w_scale, bias):
        return _emit_w8a16_linear(_TorchScriptBuilder(g, _opset()), x, w_t, w_scale, _opt(bias))

    @symbolic_helper.parse_args("v", "v", "v")
    def int8_embedding(g, ids, weight, scale):
        return _emit_int8_embedding(_TorchScriptBuilder(g, _opset()), ids, weight, scale)

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "v", "v", "v", "is", "i", "i", "v", "v", "v", "v", "v")
    def int8_conv2d(g, x, w, w_scale, bias, in_scale, in_zp, out_scale, out_zp, params, act, fmt, residual,
                    sum_scale, sum_zp, res_scale, res_zp):
        return _emit_int8_conv2d(_TorchScriptBuilder(g, _opset()), x, w, w_scale, _opt(bias), _opt(in_scale),
                                 _opt(in_zp), _opt(out_scale), _opt(out_zp), params, act, fmt, residual=_opt(residual),
                                 sum_scale=_opt(sum_scale), sum_zp=_opt(sum_zp), res_scale=_opt(res_scale),
                                 res_zp=_opt(res_zp))

    torch.onnx.register_custom_op_symbolic("pycompress_onnx::int8_conv2d", int8_conv2d, MIN_OPSET)
    torch.onnx.register_custom_op_symbolic("pycompress_onnx::int8_embedding", int8_embedding, MIN_OPSET)
    torch.onnx.register_custom_op_symbolic("pycompress_onnx::int8_linear", int8_linear, MIN_OPSET)
    torch.onnx.register_custom_op_symbolic("pycompress_onnx::w8a16_linear", w8a16_linear, MIN_OPSET)
    _SYMBOLICS_REGISTERED = True


# --------------------------------------------------------------------------- model preparation


def _int8_embedding_names(model: nn.Module) -> list[str]:
    """The ``nn.Embedding`` modules whose table is stored int8: at least
    ``EMBEDDING_MIN_ELEMENTS`` values, no ``max_norm`` (it rewrites the table), and a weight that
    no other module uses (a table tied to an output layer stays float)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    names = []
    for name, m in model.named_modules():
        if (type(m) is nn.Embedding and m.max_norm is None and m.weight.dim() == 2
                and m.weight.numel() >= EMBEDDING_MIN_ELEMENTS and uses.get(id(m.weight), 0) == 1
                and m.weight.dtype in (torch.float32, torch.float16, torch.bfloat16)):
            names.append(name)
    return names


def _with_embeddings(model: nn.Module, names: list[str], how: str) -> nn.Module:
    """``model`` (copied when ``names``) with the tables of ``names`` replaced: ``"dequantized"``
    (the float values the file computes, for the PyTorch reference) or ``"export"``
    (``_ExportInt8Embedding``)."""
    if not names:
        return model
    out = copy.deepcopy(model)
    for name in names:
        emb = out.get_submodule(name)
        if how == "export":
            _utils.set_module(out, name, _ExportInt8Embedding(emb))
        else:
            with torch.no_grad():
                q, scale = _quantize_rows(emb.weight)
                emb.weight.copy_(_dequantize_rows(q, scale).to(emb.weight.device, emb.weight.dtype))
    return out


class _FloatResidualConv(nn.Module):
    """The float twin of an ``Int8Conv2d(residual=True)``: ``activation(conv(x) + residual)``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        from pycompress.nn.int8_conv import activation_module

        self.conv = layer.to_float()
        self.act = activation_module(layer.activation)
        self.residual_scale = layer.residual_scale
        self.residual_zero_point = layer.residual_zero_point

    def forward(self, x, residual):
        if residual.dtype == torch.uint8:
            residual = (residual.to(torch.int32) - self.residual_zero_point).float() * self.residual_scale
        return self.act(self.conv(x) + residual)


def _float_twin(model: nn.Module) -> nn.Module:
    """``model`` with every ``Int8Linear`` / ``Int8Conv2d`` replaced by its dequantized float layer
    (a conv with its fused activation): the float model whose distance from ``model`` is the quantization error of its activations."""
    from pycompress import nn as pnn

    int8_cls = tuple(c for c in (getattr(pnn, "Int8Linear", None), getattr(pnn, "Int8Conv2d", None)) if c)
    if not int8_cls:
        return model

    def twin(m):  # a conv's fused activation stays: the twin differs only by the quantization
        if getattr(m, "residual", False) is True:
            return _FloatResidualConv(m)
        return m.to_float(with_activation=True) if hasattr(m, "activation") else m.to_float()

    if isinstance(model, int8_cls):
        return twin(model)
    if not any(isinstance(m, int8_cls) for m in model.modules()):
        return model
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if name and isinstance(m, int8_cls):
            _utils.set_module(out, name, twin(m))
    return out


def _export_copy(model: nn.Module, fmt: str) -> tuple[nn.Module, dict[str, int]]:
    """A CPU float copy of ``model`` with every pycompress layer swapped for its export form."""
    from pycompress import nn as pnn

    int8_cls = getattr(pnn, "Int8Linear", None)
    dense_cls = tuple(c for c in (getattr(pnn, "MaskedLinear", None), getattr(pnn, "SparseLinear", None)) if c)
    conv_cls = getattr(pnn, "Int8Conv2d", None)
    counts = {"int8_w8a8": 0, "int8_w8a16": 0, "dense_from_sparse": 0, "int8_conv": 0, "int8_conv_qdq": 0}

    def convert(m: nn.Module) -> nn.Module | None:
        if conv_cls is not None and isinstance(m, conv_cls):
            counts["int8_conv"] += 1
            layer = _ExportInt8Conv2d(m, fmt)
            counts["int8_conv_qdq"] += layer.fmt == _CONV_QDQ
            return layer
        if int8_cls is not None and isinstance(m, int8_cls):
            counts["int8_" + m.mode] += 1
            return _ExportInt8Linear(m, fmt)
        if dense_cls and isinstance(m, dense_cls):
            counts["dense_from_sparse"] += 1
            return m.to_dense().float().cpu()
        return None

    root = convert(model)
    if root is not None:
        return root.eval(), counts
    out = copy.deepcopy(model).cpu().eval()
    for name, m in list(out.named_modules()):
        if not name or isinstance(m, _ExportInt8Embedding):
            continue
        new = convert(m)
        if new is not None:
            _utils.set_module(out, name, new)
    return out, counts


def _flatten_tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            out.extend(_flatten_tensors(o))
    elif isinstance(obj, Mapping):
        for v in obj.values():
            out.extend(_flatten_tensors(v))
    return out


def _output_names(obj: Any, prefix: str = "output") -> list[str]:
    """Names parallel to ``_flatten_tensors(obj)``: dict keys where there are some."""
    if isinstance(obj, torch.Tensor):
        return [prefix]
    out: list[str] = []
    if isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            out.extend(_output_names(o, f"{prefix}_{i}"))
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            out.extend(_output_names(v, str(k) if prefix == "output" else f"{prefix}.{k}"))
    return out


class _FlatIO(nn.Module):
    """``forward(*tensors) -> tuple of tensors`` around a model taking the original batch layout."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.model = model
        # positions of tensors among args / kwargs; other values are baked in as constants
        self._args = [("t", None) if isinstance(a, torch.Tensor) else ("c", a) for a in args]
        self._kwargs = [(k, ("t", None) if isinstance(v, torch.Tensor) else ("c", v)) for k, v in kwargs.items()]

    def forward(self, *tensors):
        it = iter(tensors)
        args = [next(it) if kind == "t" else v for kind, v in self._args]
        kwargs = {k: (next(it) if kind == "t" else v) for k, (kind, v) in self._kwargs}
        return tuple(_flatten_tensors(self.model(*args, **kwargs)))


def _normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("example_inputs: dict keys must be argument names (str)")
        return (), dict(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments, got {type(example_inputs).__name__}"
    )


def _check_signature(model: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(
            f"example_inputs do not fit {type(model).__name__}.forward{sig}: {e} "
            f"(got {len(args)} positional and {len(kwargs)} keyword argument(s))"
        ) from None


def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not path or os.path.isdir(path):
        raise ValueError(f"path must name a file, got {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write {path}: no write permission")
    return path


def _warn_specialized(proto, dynamic_axes: dict) -> None:
    """Warns when an axis asked to be dynamic came out with a fixed size (the exporter
    specialized it, e.g. because the model branches on it)."""
    fixed = []
    for v in list(proto.graph.input) + list(proto.graph.output):
        spec = dynamic_axes.get(v.name) or {}
        axes = spec if isinstance(spec, (list, tuple)) else list(spec)
        dims = v.type.tensor_type.shape.dim
        for a in axes:
            if int(a) < len(dims) and dims[int(a)].HasField("dim_value"):
                fixed.append(f"{v.name}[{a}] = {dims[int(a)].dim_value}")
    if fixed:
        warnings.warn("export_onnx: axes requested as dynamic were exported with a fixed size: "
                      + ", ".join(fixed) + " (the model's code depends on them)", stacklevel=3)


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Exporter chatter (optional torchvision ops, constant-folding attempts) is not for users."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _exporter_supports_dynamo() -> bool:
    try:
        params = inspect.signature(torch.onnx.export).parameters
    except (TypeError, ValueError):
        return False
    return "dynamo" in params and "custom_translation_table" in params


def _default_opset(use_dynamo: bool) -> int:
    """ATTENTION_OPSET where the torch.export-based exporter is used and the installed onnx
    (>= 1.18) and onnxruntime (>= 1.23, its CPU ``Attention`` kernel) know it, else DEFAULT_OPSET."""
    if not use_dynamo:
        return DEFAULT_OPSET
    try:
        import onnx
        import onnxruntime

        ort_version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2])
        if onnx.defs.onnx_opset_version() >= ATTENTION_OPSET and ort_version >= (1, 23):
            return ATTENTION_OPSET
    except (ImportError, ValueError, AttributeError):
        pass
    return DEFAULT_OPSET


def _default_dynamic_axes(tensors: list[torch.Tensor], in_names: list[str], out_names: list[str],
                          outputs: list[torch.Tensor]) -> dict:
    """Dim 0 of every input (and of every output of the same leading size) is ``"batch"`` when
    all inputs share their leading size; whatever that size is (even one row)."""
    if not tensors or any(t.dim() == 0 for t in tensors):
        return {}
    b = tensors[0].shape[0]
    if any(t.shape[0] != b for t in tensors):
        return {}
    axes = {n: {0: "batch"} for n in in_names}
    axes.update({n: {0: "batch"} for n, o in zip(out_names, outputs) if o.dim() >= 1 and o.shape[0] == b})
    return axes


def _check_dynamic_axes(dynamic_axes: Any, in_names: list[str], inputs: list[torch.Tensor],
                        out_names: list[str], outputs: list[torch.Tensor]) -> dict:
    """``dynamic_axes`` checked against the graph's inputs and outputs, as ``{name: {axis: label}}``."""
    if not isinstance(dynamic_axes, Mapping):
        raise TypeError(f"dynamic_axes must be a dict {{name: {{axis: label}}}}, got {type(dynamic_axes).__name__}")
    ranks = {n: t.dim() for n, t in zip(in_names, inputs)}
    ranks.update({n: t.dim() for n, t in zip(out_names, outputs) if n not in ranks})
    out: dict[str, dict[int, str]] = {}
    for name, spec in dynamic_axes.items():
        if name not in ranks:
            known = ", ".join(repr(n) for n in [*in_names, *out_names])
            raise ValueError(f"dynamic_axes names {name!r}, which is neither an input nor an output of the "
                             f"exported graph (its inputs and outputs are: {known})")
        if isinstance(spec, (list, tuple)):
            spec = {a: f"{name}_dim{a}" for a in spec}
        if not isinstance(spec, Mapping):
            raise TypeError(f"dynamic_axes[{name!r}] must be a dict {{axis: label}} or a list of axes, "
                            f"got {type(spec).__name__}")
        axes: dict[int, str] = {}
        for axis, label in spec.items():
            if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < ranks[name]:
                raise ValueError(f"dynamic_axes[{name!r}]: axis {axis!r} is out of range for a tensor of rank "
                                 f"{ranks[name]} (axes are 0 .. {ranks[name] - 1})")
            axes[axis] = str(label)
        out[name] = axes
    return out


def _tracing_example(tensors: list[torch.Tensor], in_names: list[str], dynamic_axes: dict) -> list[torch.Tensor]:
    """The example with every dynamic axis of size 1 repeated to size 2: exporters specialize
    sizes 0 and 1 to constants, so tracing at size 1 would fix a dynamic axis."""
    out = []
    for name, t in zip(in_names, tensors):
        for axis in (dynamic_axes.get(name) or {}):
            if t.shape[axis] == 1:
                t = torch.cat([t, t], dim=axis)
        out.append(t)
    return out


def _dynamic_shapes(dynamic_axes: dict, input_names: list[str]) -> tuple:
    """``dynamic_axes`` (by input name) as torch.export ``dynamic_shapes`` of ``_FlatIO.forward``."""
    dims: dict[str, Any] = {}
    per_input = []
    for name in input_names:
        spec = dynamic_axes.get(name) or {}
        if isinstance(spec, (list, tuple)):
            spec = {int(a): f"{name}_dim{a}" for a in spec}
        if not isinstance(spec, Mapping):
            raise TypeError(f"dynamic_axes[{name!r}] must be a dict {{axis: label}} or a list of axes")
        d = {}
        for axis, label in spec.items():
            label = str(label)
            if label not in dims:
                dims[label] = torch.export.Dim(label if label.isidentifier() else f"d{len(dims)}")
            d[int(axis)] = dims[label]
        per_input.append(d or None)
    return (tuple(per_input),)


# --------------------------------------------------------------------------- verification


def _run_ort(path: str, tensors: list[torch.Tensor], threads: int | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # w8a16 layers (DequantizeLinear -> MatMul) become MatMulNBits, which by default quantizes
    # its activations to int8; the check compares the file's fp32 arithmetic with PyTorch's
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(tensors):
        raise ValueError(f"the exported file takes {len(names)} input(s), got {len(tensors)} tensor(s)")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
    return sess.run(None, feed)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else (1.0 if np.array_equal(a, b) else 0.0)


def compare_outputs(reference: list[torch.Tensor], outputs: list[np.ndarray],
                    float_reference: list[torch.Tensor] | None = None) -> list[dict]:
    """Per output: ``cosine`` and ``max_abs`` difference of ``outputs`` from ``reference``
    (PyTorch), ``scale`` (its largest magnitude), ``err`` = ||output - reference||; with
    ``float_reference`` (the float model) also ``quant_err`` = ||reference - float_reference||,
    ``quant_cosine`` and ``worst`` = (row, err / quant_err of that row) along dim 0."""
    if len(reference) != len(outputs):
        raise OnnxVerificationError(
            f"the exported model returns {len(outputs)} output(s), PyTorch returned {len(reference)}")
    res = []
    for i, (r, o) in enumerate(zip(reference, outputs)):
        r64 = r.detach().cpu().double().numpy()
        o64 = np.asarray(o, dtype=np.float64)
        if r64.shape != o64.shape:
            raise OnnxVerificationError(f"output {i}: shape {o64.shape} in ONNX Runtime, {r64.shape} in PyTorch")
        a, b = r64.ravel(), o64.ravel()
        st = {"cosine": _cos(a, b), "max_abs": float(np.abs(a - b).max()) if a.size else 0.0,
              "scale": float(np.abs(a).max()) if a.size else 0.0,
              "err": float(np.linalg.norm(a - b)), "norm": float(np.linalg.norm(a))}
        if float_reference is not None:
            f64 = float_reference[i].detach().cpu().double().numpy()
            st["quant_err"] = float(np.linalg.norm(r64 - f64))
            st["quant_cosine"] = _cos(a, f64.ravel())
            if r64.ndim >= 1 and r64.shape[0] > 1:
                n = r64.shape[0]
                e_row = np.linalg.norm((o64 - r64).reshape(n, -1), axis=1)
                q_row = np.linalg.norm((r64 - f64).reshape(n, -1), axis=1)
                ratio = e_row / np.maximum(q_row, 1e-30)
                w = int(np.argmax(ratio))
                st["worst"] = (w, float(ratio[w]))
        res.append(st)
    return res


def _check_stats(stats: list[dict], output_names: list[str], name: str) -> None:
    """Raises OnnxVerificationError for the first output outside the allowance (see export_onnx)."""
    for i, s in enumerate(stats):
        quant = s.get("quant_err", 0.0)
        bound = VERIFY_RATIO * quant + VERIFY_FLOAT_TOL * s["norm"] + 1e-6
        if s["err"] <= bound:  # NaN fails
            continue
        out = output_names[i] if i < len(output_names) else f"output {i}"
        rel = s["err"] / s["norm"] if s["norm"] > 0 else float("inf")
        msg = (f"{name}: output {i} ({out!r}) in ONNX Runtime is {rel:.3g} (relative L2) from the PyTorch "
               f"model, cosine {s['cosine']:.6f}, max abs difference {s['max_abs']:.4g}")
        if quant > 0:
            msg += (f"; that is {s['err'] / quant:.2f}x the PyTorch model's own quantization error "
                    f"({quant / s['norm']:.3g} relative L2 from its float version, cosine "
                    f"{s['quant_cosine']:.6f}); allowed: {VERIFY_RATIO:g}x + {VERIFY_FLOAT_TOL:g} x |output|")
            if "worst" in s:
                msg += f"; worst row {s['worst'][0]}: {s['worst'][1]:.2f}x its own quantization error"
        else:
            msg += f"; allowed: {VERIFY_FLOAT_TOL:g} x |output| (the model has no quantized activations)"
        raise OnnxVerificationError(msg)


def _verify(path: str, tensors: list[torch.Tensor], reference: list[torch.Tensor], name: str | None = None,
            float_reference: list[torch.Tensor] | None = None,
            output_names: list[str] | None = None) -> list[dict]:
    """Runs the file at ``path`` in ONNX Runtime on ``tensors`` and compares with ``reference``
    (the PyTorch model), allowing ``VERIFY_RATIO`` x its distance from ``float_reference``
    (``name``: the file name to report)."""
    name = path if name is None else name
    stats = compare_outputs(reference, _run_ort(path, tensors), float_reference)
    _check_stats(stats, list(output_names or []), name)
    return stats


def verify_onnx(path: str | os.PathLike, model: nn.Module, example_inputs: Any, *,
                int8_embeddings: bool = True) -> list[dict]:
    """Checks an ONNX file written by :func:`export_onnx` from ``model`` against it on
    ``example_inputs``, by the rule of ``export_onnx(verify=True)`` (``int8_embeddings`` as given
    to the export); returns the per-output statistics of :func:`compare_outputs` and raises
    :class:`OnnxVerificationError` naming the output and how far it is."""
    _require("onnxruntime")
    onnx = _require("onnx")
    args, kwargs = _normalize_inputs(example_inputs)
    tensors = ([a.detach().cpu() for a in args if isinstance(a, torch.Tensor)]
               + [v.detach().cpu() for v in kwargs.values() if isinstance(v, torch.Tensor)])
    names = [o.name for o in onnx.load(os.fspath(path), load_external_data=False).graph.output]
    emb = _int8_embedding_names(model) if int8_embeddings else []
    reference, float_reference = _references(model, args, kwargs, tensors, emb)
    return _verify(os.fspath(path), tensors, reference, float_reference=float_reference, output_names=names)


def _references(model: nn.Module, args: tuple, kwargs: dict, tensors: list[torch.Tensor],
                emb_names: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """PyTorch outputs of ``model`` with the tables of ``emb_names`` as the file stores them
    (the reference), and of its float twin (the yardstick of the quantization error)."""
    ref_model = _with_embeddings(model, emb_names, "dequantized")
    twin = _float_twin(ref_model)

    def run(m):
        was = m.training
        m.eval()
        try:
            with torch.no_grad():
                out = _utils.call_model(m, _rebuild_batch(args, kwargs, tensors), what="model")
        finally:
            m.train(was)
        return [t.detach().float().cpu() for t in _flatten_tensors(out)]

    ref = run(ref_model)
    return ref, (ref if twin is ref_model else run(twin))


def _temp_path(path: str) -> str:
    """A new empty file next to ``path`` (same folder, so ``os.replace`` is atomic), created
    with the permissions a plain ``open(path, "w")`` would give."""
    folder, base = os.path.split(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def _rebuild_batch(args: tuple, kwargs: dict, tensors: list[torch.Tensor]):
    """The example batch (as ``_utils.call_model`` takes it) with its tensors replaced."""
    it = iter(tensors)
    new_args = tuple(next(it) if isinstance(a, torch.Tensor) else a for a in args)
    new_kwargs = {k: (next(it) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    if new_kwargs:  # _normalize_inputs gives either positional or keyword arguments
        return new_kwargs
    return new_args[0] if len(new_args) == 1 else new_args


# --------------------------------------------------------------------------- public API


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict | None = None,
    opset: int | None = None,
    verify: bool = True,
    *,
    int8_format: str = "auto",
    int8_embeddings: bool = True,
    exporter: str = "auto",
    attention: str = "fused",
) -> str:
    """Exports ``model`` (with pycompress layers) to an ONNX file runnable by ONNX Runtime.

    ``Int8Linear`` layers become per-token ``QuantizeLinear`` + ONNX Runtime's integer
    ``MatMulIntegerToFloat`` on int8 weights (standard ``MatMulInteger`` with
    ``int8_format="standard"``), ``Int8Conv2d`` layers the QDQ form that ONNX Runtime fuses into
    ``QLinearConv`` / ``QLinearAdd`` where they allow it, else (and with ``int8_format="exact"``)
    ``QuantizeLinear`` + ``ConvInteger`` + their fp32 epilogue, large embedding tables int8 rows,
    ``w8a16`` layers ``DequantizeLinear + MatMul``, ``MaskedLinear`` / ``SparseLinear`` dense
    ``MatMul`` / ``Gemm`` with their zeros (see the module docstring). ``model`` is not modified.

    Args:
        model: the model (CPU or CUDA; exported from a CPU float32 copy).
        example_inputs: a batch: a tensor, a tuple of positional arguments or a dict of keyword
            arguments (tensors become graph inputs; other values are baked in).
        path: output ``.onnx`` file (its folder must exist).
        input_names / output_names: graph input / output names (default: the dict keys, or
            ``input_0, ...``; ``output_0, ...``). Outputs are the model's output tensors
            flattened in order (a ``ModelOutput`` gives its fields in order).
        dynamic_axes: as in ``torch.onnx.export`` (``{name: {axis: "label"}}`` or
            ``{name: [axes]}``); every name must be an input or output of the graph and every
            axis within its tensor's rank, else ValueError. Default: dim 0 of every input (and of
            every output with the same leading size) is a dynamic ``"batch"`` axis whenever all
            inputs share their leading size, whatever it is (a one-row example included: the
            model is then traced on the example repeated to 2 rows, since exporters fix sizes 0
            and 1); ``{}`` exports static shapes.
        opset: ONNX opset (>= 15). Default: 23 with the torch.export-based exporter where the
            installed onnx (>= 1.18) and onnxruntime (>= 1.23) have it (its standard
            ``Attention`` operator), else 18. The TorchScript exporter writes opsets up to 20.
        verify: run the file in ONNX Runtime on ``example_inputs`` (and on the 2-row tracing
            example when the example had one row) and compare with the PyTorch model (with its
            embedding tables as the file stores them). Per output, ONNX Runtime's L2 distance
            from the PyTorch model may be at most ``VERIFY_RATIO`` (2) x the PyTorch model's own
            distance from its float version (every ``Int8Linear`` / ``Int8Conv2d`` replaced by its
            dequantized ``nn.Linear`` / ``nn.Conv2d`` and fused activation: the quantization error
            of the activations) + ``VERIFY_FLOAT_TOL``
            (1e-4) x the output's norm. Two engines whose float arithmetic differs in the last
            bit requantize some activations one step apart, and deep models carry such steps
            through every layer, so their outputs differ by up to the order of the quantization
            error itself (two independent roundings: sqrt(2) x one); a wrong scale, a transposed
            weight or a saturating kernel lands far beyond. Otherwise
            :class:`OnnxVerificationError` (a ValueError) names the output, its relative distance,
            cosine, the ratio and the worst row, and ``path`` is not written (a previous file
            there is kept). ``onnx.checker`` always runs. :func:`verify_onnx` applies the same
            check to an existing file.
        int8_format: form of the int8 layers. ``"auto"`` (default): ``Int8Linear`` (``w8a8``) as
            ``"contrib-u8s8"``, ``Int8Conv2d`` as ``"qdq"`` where the layer allows it and the
            exact form elsewhere; should the file then fail ``verify``, it is written again with
            ``"exact"`` and a warning says so. ``"contrib-u8s8"``:
            per-token ``QuantizeLinear`` to u8 and ONNX Runtime's
            ``com.microsoft.MatMulIntegerToFloat`` on int8 weights, its fastest x86 kernels;
            exact on CPUs with VNNI or AMX, and on AVX2 alone for models quantized with
            ``weight_bits=7`` or ``act_bits=7`` (8-bit x 8-bit pairs can saturate there, as in
            ONNX Runtime's own int8 models). ``"standard"``: standard operators only
            (``MatMulInteger``; u8 x u8 for 8-bit layers: exact everywhere, slower; u8 x s8 for
            7-bit ones). ``"u8u8"``, ``"u8s8"``, ``"s8s8"`` (standard operators with those
            types), ``"contrib"`` (= ``"contrib-u8s8"``), ``"contrib-u8u8"``, ``"contrib-s8s8"``.
            ``"qdq"``: the linear layers as ``"auto"``; the ``Int8Conv2d`` layers with a
            calibrated input, a uint8 output or a uint8 residual, and no activation other than
            ReLU / ReLU6 as ``DequantizeLinear`` around ``Conv``, which ONNX Runtime fuses into
            its ``QLinearConv`` kernels (several times faster than ``ConvInteger`` and the fp32
            epilogue, about as fast as ONNX Runtime's own quantized CNNs; a residual addition
            into ``QLinearAdd``, after the conv's part of the sum is rounded to uint8 with the
            range calibration recorded, ``Int8Conv2d.sum_scale``). The integer sums stay
            the PyTorch op's, but the requantization is ONNX Runtime's (the bias rounded to the
            sum's scale, one rounding of the rescaled sum), so outputs can land a step from the
            PyTorch model's; ``verify`` judges the file as for every form. The other convs keep
            the exact form. ``"exact"``: the linear layers as ``"auto"``; every ``Int8Conv2d`` as
            ``QuantizeLinear`` + ``ConvInteger`` (uint8 weights) + the op's fp32 epilogue, the
            PyTorch op's integers and epilogue (several times slower in ONNX Runtime).
        int8_embeddings: store every ``nn.Embedding`` table of at least 16384 values that no
            other module shares (and without ``max_norm``) as int8 with one fp32 scale per row
            (``Gather`` + ``Cast`` + ``Mul``; default True). The PyTorch model is not changed;
            ``verify`` compares with it using the same dequantized tables.

        exporter: ``"auto"`` (torch.export-based exporter when this torch has
            ``custom_translation_table`` (2.6+) and onnxscript is installed, else TorchScript),
            ``"dynamo"`` or ``"torchscript"``.
        attention: ``"fused"`` (default): each ``F.scaled_dot_product_attention`` call becomes
            one fused operator, the standard ``Attention`` at opset >= 23 and ONNX Runtime's
            ``com.microsoft.MultiHeadAttention`` below (the standard-operator
            ``int8_format`` values keep the decomposition there), where the exporter knows the head
            counts and sizes (the torch.export-based exporter does for Hugging Face models; the
            TorchScript one often does not), without dropout and, for causal attention, with as
            many queries as keys; other calls keep the exporter's own form.
            ``"exporter"``: as ``torch.onnx.export`` writes it (``MatMul`` / ``Softmax`` below
            opset 23; from opset 23 recent exporters write the standard ``Attention`` on the
            4-D layout themselves). For ONNX Runtime's ``quantize_dynamic``, export with
            ``opset=18, attention="exporter"``: it (1.32) mistakes the standard ``Attention`` for
            its own ``com.microsoft.Attention`` and writes a file that does not load.

    Returns:
        ``path`` (str).

    Raises:
        ImportError: onnx / onnxruntime (or onnxscript for the torch.export path) missing.
        TypeError / ValueError: bad arguments, inputs that do not fit ``model.forward``, an
            example with 0 rows, ``dynamic_axes`` naming no input/output or an axis out of range.
        OnnxVerificationError: ONNX Runtime disagrees with PyTorch (``verify=True``).
        FileNotFoundError / PermissionError: the file cannot be written.

    Example:
        >>> import torch, pycompress, tempfile, os
        >>> m = pycompress.quantize(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
        ...                                             torch.nn.Linear(32, 4)))
        >>> f = os.path.join(tempfile.mkdtemp(), "m.onnx")
        >>> pycompress.export_onnx(m, torch.randn(8, 16), f) == f
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if int8_format not in INT8_FORMATS:
        raise ValueError(f"int8_format must be one of {INT8_FORMATS}, got {int8_format!r}")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    if attention not in ATTENTION_FORMS:
        raise ValueError(f"attention must be one of {ATTENTION_FORMS}, got {attention!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET):
        raise ValueError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    onnx = _require("onnx")
    _require("onnxruntime")
    path = _check_path(path)
    args, kwargs = _normalize_inputs(example_inputs)
    _check_signature(model, args, kwargs)

    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        raise ValueError("example_inputs hold no tensor")
    tensors = [t.detach().cpu() for t in tensors]
    if input_names is None:
        input_names = ([f"input_{i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
                       + [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)])
        if len(input_names) == 1 and not kwargs:
            input_names = ["input"]
    input_names = list(input_names)
    if len(input_names) != len(tensors):
        raise ValueError(f"input_names has {len(input_names)} name(s) for {len(tensors)} input tensor(s)")

    for name, t in zip(input_names, tensors):
        if t.dim() >= 1 and t.shape[0] == 0:
            raise ValueError(f"example_inputs: input {name!r} has 0 rows (shape {tuple(t.shape)}); the export "
                             "runs the model on the example, which needs at least one row")

    # the file stores large embedding tables int8 per row: the PyTorch reference is the model
    # with those tables dequantized (the float values the file computes)
    emb_names = _int8_embedding_names(model) if int8_embeddings else []
    ref_model = _with_embeddings(model, emb_names, "dequantized")
    twin = _float_twin(ref_model)

    def run_model(batch_tensors: list[torch.Tensor], m: nn.Module = ref_model) -> Any:
        was_training = m.training
        m.eval()
        try:
            with torch.no_grad():
                return _utils.call_model(m, _rebuild_batch(args, kwargs, batch_tensors), what="model")
        finally:
            m.train(was_training)

    def floats(out: Any) -> list[torch.Tensor]:
        return [t.detach().float().cpu() for t in _flatten_tensors(out)]

    ref_out = run_model(tensors)
    reference = floats(ref_out)
    if not reference:
        raise ValueError(f"{type(model).__name__} returned no tensor")
    float_reference = reference if twin is ref_model or not verify else floats(run_model(tensors, twin))
    if output_names is None:
        output_names = _output_names(ref_out)
        if len(set(output_names)) != len(output_names) or len(output_names) != len(reference):
            output_names = [f"output_{i}" for i in range(len(reference))]
        elif len(output_names) == 1:
            output_names = ["output"]
    output_names = list(output_names)
    if len(output_names) != len(reference):
        raise ValueError(f"output_names has {len(output_names)} name(s) for {len(reference)} output tensor(s)")
    if dynamic_axes is None:
        dynamic_axes = _default_dynamic_axes(tensors, input_names, output_names, reference)
    else:
        dynamic_axes = _check_dynamic_axes(dynamic_axes, input_names, tensors, output_names, reference)
    # traced at size >= 2 along every dynamic axis (see _tracing_example)
    trace = _tracing_example(tensors, input_names, dynamic_axes)
    enlarged = any(t is not u for t, u in zip(trace, tensors))
    trace_reference = None
    if enlarged:
        try:
            trace_out = run_model(trace)
        except ValueError as e:
            raise ValueError(f"{e} — the export traces the model on the example repeated to 2 along its "
                             "dynamic axes of size 1; pass a larger example, or dynamic_axes={} for a "
                             "static export") from e
        trace_reference = floats(trace_out)
        trace_float = (trace_reference if twin is ref_model or not verify else floats(run_model(trace, twin)))

    _define_ops()
    cpu_args = tuple(a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args)
    cpu_kwargs = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with_tables = _with_embeddings(model, emb_names, "export")

    use_dynamo = exporter == "dynamo"
    if exporter == "auto":
        try:
            import onnxscript  # noqa: F401

            use_dynamo = _exporter_supports_dynamo()
        except ImportError:
            use_dynamo = False
    if use_dynamo:
        if not _exporter_supports_dynamo():
            raise RuntimeError(f"torch {torch.__version__}: torch.onnx.export has no custom_translation_table "
                               "(torch >= 2.6 needed); use exporter='torchscript'")
        _require("onnxscript")
    if opset is None:
        opset = _default_opset(use_dynamo)
    elif not use_dynamo and opset > TORCHSCRIPT_MAX_OPSET:
        raise ValueError(f"opset {opset}: the TorchScript exporter writes opsets up to {TORCHSCRIPT_MAX_OPSET}")
    # the forms whose linear layers are standard operators keep ONNX Runtime's contrib attention
    # out of the file too
    contrib_attention = _resolve_format(int8_format, 8).startswith("contrib")
    params = inspect.signature(torch.onnx.export).parameters

    def export(dyn: dict, target: str, fmt: str) -> dict[str, int]:
        export_model, counts = _export_copy(with_tables, fmt)
        wrapper = _FlatIO(export_model, cpu_args, cpu_kwargs).eval()
        export_kw = dict(input_names=input_names, output_names=output_names, opset_version=opset)
        if use_dynamo:
            export_kw.update(dynamo=True, custom_translation_table=_translation_table(opset, attention, contrib_attention))
            if dyn:
                export_kw["dynamic_shapes"] = _dynamic_shapes(dyn, input_names)
            if "external_data" in params:
                export_kw["external_data"] = False
            if "verbose" in params:
                export_kw["verbose"] = False
            proto = torch.onnx.export(wrapper, tuple(trace), None, **export_kw).model_proto
            try:
                onnx.checker.check_model(proto)
            except onnx.checker.ValidationError:
                if "optimize" not in params:
                    raise
                # the exporter's graph optimizer (onnxscript) has produced dangling references
                # for some graphs (e.g. Flatten feeding a BERT layer with torch 2.13 /
                # onnxscript 0.7.2): export again without it; ONNX Runtime optimizes at load
                export_kw["optimize"] = False
                proto = torch.onnx.export(wrapper, tuple(trace), None, **export_kw).model_proto
            _reorder_gelu(proto.graph)
            _hide_int8_linear_shapes(proto.graph)
            onnx.save_model(proto, target)
        else:
            _register_symbolics()
            if dyn:
                export_kw["dynamic_axes"] = dyn
            if "dynamo" in params:
                export_kw["dynamo"] = False
            with _sdpa_symbolic(attention == "fused" and contrib_attention):
                torch.onnx.export(wrapper, tuple(trace), target, do_constant_folding=True, **export_kw)
        return counts

    # written to a temporary file next to ``path``, checked and verified there, then moved into
    # place with os.replace: ``path`` is either the previous file or the new, verified one
    tmp = _temp_path(path)

    def write(fmt: str) -> int:
        """Exports to ``tmp`` in ``fmt`` and checks it; the number of convs in the fused form."""
        with warnings.catch_warnings(), torch.no_grad(), _quiet_loggers("onnxscript", "torch.onnx"):
            warnings.simplefilter("ignore")
            counts = export(dynamic_axes, tmp, fmt)
        onnx.checker.check_model(tmp)
        _warn_specialized(onnx.load(tmp, load_external_data=False), dynamic_axes)
        return counts["int8_conv_qdq"]

    def check() -> None:
        if verify:
            _verify(tmp, tensors, reference, name=path, float_reference=float_reference,
                    output_names=output_names)
            if trace_reference is not None:
                _verify(tmp, trace, trace_reference, name=path, float_reference=trace_float,
                        output_names=output_names)

    try:
        fused = write(int8_format)
        try:
            check()
        except OnnxVerificationError as e:
            # "auto" writes the convs ONNX Runtime fuses in the "qdq" form, which requantizes
            # with ONNX Runtime's rounding; where that lands too far from the PyTorch model, the
            # exact form (ConvInteger) is written instead
            if int8_format != "auto" or not fused:
                raise OnnxVerificationError(
                    f"{e}; {path} was not written (a previous file there is kept); export with "
                    "verify=False to inspect the file") from None
            write("exact")
            try:
                check()
            except OnnxVerificationError as e2:
                raise OnnxVerificationError(
                    f"{e2}; {path} was not written (a previous file there is kept; the fused conv form "
                    "failed too); export with verify=False to inspect the file") from None
            warnings.warn(f"export_onnx: {path}: the convs in the form ONNX Runtime fuses failed the check "
                          f"({e}); the file holds the exact form (int8_format='exact'), which ONNX Runtime "
                          "runs several times slower", stacklevel=2)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _utils.fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path
