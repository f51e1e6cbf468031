"""``Int8Linear``: a drop-in replacement for ``nn.Linear`` with int8 weights."""

from __future__ import annotations

import torch
from torch import nn

import pycompress.ops as ops
from pycompress._ext import direct_op, plain_eager
from pycompress._utils import check_int8_bits

__all__ = ["Int8Linear"]

_MODES = ("w8a8", "w8a16")
# The hot path of forward calls the op itself, through its typed entry point (direct_op): the
# weight was packed and checked when it was set (repack), the op checks shapes, dtypes and
# devices in C++, and anything it rejects goes through the validated wrapper, which names the
# problem. Other tensor types, torch function modes and torch.compile take the validated path.
_int8_linear = direct_op("int8_linear") or torch.ops.pycompress.int8_linear.default
_int8_linear_w8a16 = direct_op("int8_linear_w8a16") or torch.ops.pycompress.int8_linear_w8a16.default
_CALL_ERRORS = (RuntimeError, TypeError, ValueError)


class Int8Linear(nn.Module):
    """Linear layer with per-output-channel symmetric int8 weights.

    Modes:
        ``"w8a8"``: activations are quantized per token on the fly (symmetric int8, scale
        ``absmax / 127``), multiplied in int32 and dequantized in the fused epilogue
        (:func:`pycompress.ops.int8_linear`). Fastest for medium and large batches.
        With ``act_bits=7`` (w8a8 only) activations are quantized to 7 bits per token (scale
        ``absmax / 63``), which lets AVX2 CPUs without VNNI use a faster exact ``vpmaddubsw``
        kernel at a small accuracy cost (still per token, unlike torch.ao's per-tensor 7 bits).
        With ``weight_bits=7`` as well (w8a8 only) the weights are quantized per channel to
        ``[-63, 63]`` (scale ``absmax / 63``); on AVX2 CPUs the 7-bit x 7-bit product then adds
        the int16 pair sums of two groups of 4 k values before widening (still exact): about
        1.1-1.2x faster than ``act_bits=7`` alone, at about the accuracy of torch.ao dynamic int8
        on Gaussian data.
        ``"w8a16"``: weight-only; activations stay in floating point and the weight is
        dequantized inside the kernel (:func:`pycompress.ops.int8_linear_w8a16`). Best for
        small batches on GPUs; on the CPU it runs an AVX2/FMA kernel converting the int8
        weight to fp32 in registers (more accurate than w8a8, slower at large batch).

    Buffers (all in ``state_dict``): ``weight`` int8 ``[out, in]``, ``weight_scale`` fp32
    ``[out]``, ``bias`` (fp32 ``[out]`` or None). On the CPU the weight is additionally kept
    pre-packed for the GEMM kernel in the non-persistent buffer ``weight_packed``; it is
    rebuilt after ``load_state_dict`` and by :meth:`repack` (call it after editing ``weight``
    in place).

    Example:
        >>> import torch
        >>> from pycompress.nn import Int8Linear
        >>> lin = torch.nn.Linear(64, 32)
        >>> q = Int8Linear.from_float(lin)
        >>> x = torch.randn(4, 64)
        >>> bool((q(x) - lin(x)).norm() / lin(x).norm() < 0.02)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "w8a8",
        device=None,
        act_bits: int = 8,
        weight_bits: int = 8,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        check_int8_bits("act_bits", act_bits, mode)
        check_int8_bits("weight_bits", weight_bits, mode)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.mode = mode
        self.act_bits = int(act_bits)
        self.weight_bits = int(weight_bits)
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.register_buffer("bias", None)
        self.register_buffer("weight_packed", torch.empty(0, dtype=torch.int8, device=device), persistent=False)
        self.register_load_state_dict_post_hook(Int8Linear._after_load)
        self.repack()

    # ------------------------------------------------------------------ construction

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, mode: str = "w8a8", act_bits: int = 8,
                   weight_bits: int = 8) -> "Int8Linear":
        """Quantizes ``linear`` (per output channel: ``scale = absmax / 127``, round half to even).

        ``act_bits`` (w8a8): 8 (default) or 7 bits per-token activation quantization.
        ``weight_bits`` (w8a8): 8 (default) or 7: per-channel weight scale ``absmax / 63`` and
        values in ``[-63, 63]``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        check_int8_bits("act_bits", act_bits, mode)
        check_int8_bits("weight_bits", weight_bits, mode)
        qmax = 63.0 if weight_bits == 7 else 127.0
        w = linear.weight.detach().float()
        absmax = w.abs().amax(dim=1)
        if not torch.isfinite(absmax).all():
            raise ValueError("from_float: the weight holds NaN or inf values")
        scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
        q = torch.round(w / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode,
                device=w.device, act_bits=act_bits, weight_bits=weight_bits)
        m.weight.copy_(q)
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        m.repack()
        return m

    def config(self) -> dict:
        """JSON-serializable description from which :meth:`from_config` rebuilds the layer."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "mode": self.mode,
            "act_bits": self.act_bits,
            "weight_bits": self.weight_bits,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> "Int8Linear":
        """Builds a layer with buffers of the right shapes (values to be loaded with ``load_state_dict``)."""
        return cls(cfg["in_features"], cfg["out_features"], bias=cfg.get("bias", True),
                   mode=cfg.get("mode", "w8a8"), act_bits=cfg.get("act_bits", 8),
                   weight_bits=cfg.get("weight_bits", 8))

    @torch.no_grad()
    def to_float(self) -> nn.Linear:
        """The dequantized equivalent ``nn.Linear`` (fp32, same device)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device)
        lin.weight.copy_(self.weight.float() * self.weight_scale.float()[:, None])
        if self.bias is not None:
            lin.bias.copy_(self.bias.float())
        return lin

    # ------------------------------------------------------------------ packing

    @torch.no_grad()
    def repack(self) -> None:
        """Re-packs ``weight`` for the CPU kernel (no-op off the CPU)."""
        if self.weight.device.type == "cpu":
            self.weight_packed = ops.int8_pack_weight(self.weight)
        else:
            self.weight_packed = torch.empty(0, dtype=torch.int8, device=self.weight.device)

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        module.repack()

    def _apply(self, fn, recurse=True):
        scale_before = self.weight_scale
        moved = super()._apply(fn, recurse)
        # dtype casts (.half(), .to(bf16)) must not round the fp32 weight scales, and the
        # packed copy is valid only next to a CPU weight.
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale_before.to(device=self.weight_scale.device, dtype=torch.float32)
        expected = ops.int8_packed_bytes(self.out_features, self.in_features)
        if self.weight.device.type == "cpu" and (
            self.weight_packed.device.type != "cpu" or self.weight_packed.numel() != expected
        ):
            self.repack()
        return moved

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain_eager(x):
            b = self._buffers
            try:
                k = self.in_features
                x2 = x if x.dim() == 2 else x.reshape(-1, k) if x.dim() >= 1 and x.shape[-1] == k else None
                if x2 is not None:
                    if self.mode == "w8a8":
                        y = _int8_linear(x2, b["weight"], b["weight_scale"], b["bias"], b["weight_packed"],
                                         self.act_bits)
                    else:
                        y = _int8_linear_w8a16(x2, b["weight"], b["weight_scale"], b["bias"])
                    return y if x2 is x else y.reshape(*x.shape[:-1], self.out_features)
            except _CALL_ERRORS:
                pass  # the validated call below raises the error that names the problem
        return self._forward_checked(x)

    def _forward_checked(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if (bias is not None and isinstance(x, torch.Tensor) and bias.dtype != x.dtype
                and bias.dtype != torch.float32):
            bias = bias.float()
        if self.mode == "w8a16":
            return ops.int8_linear_w8a16(x, self.weight, self.weight_scale, bias)
        packed = self.weight_packed
        use_packed = (
            self.weight.device.type == "cpu"
            and packed.numel() == ops.int8_packed_bytes(self.out_features, self.in_features)
        )
        return ops.int8_linear(x, self.weight, self.weight_scale, bias,
                               w_packed=packed if use_packed else None, act_bits=self.act_bits)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode}"
            + (f", act_bits={self.act_bits}" if self.mode == "w8a8" else "")
            + (f", weight_bits={self.weight_bits}" if self.weight_bits != 8 else "")
        )
