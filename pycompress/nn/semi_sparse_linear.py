"""SemiSparseLinear: an inference linear layer with a 2:4 semi-structured sparse weight."""

from __future__ import annotations

import torch
from torch import nn

from pycompress._ext import direct_op, plain_eager
from pycompress.nn._common import linear_from_weight
from pycompress.nn.masked_linear import dense_weight_and_mask
from pycompress.ops import semi24 as semi24_ops

__all__ = ["SemiSparseLinear"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The hot path of forward calls the op itself (see SparseLinear): the op checks its arguments in
# C++ (the 2-bit positions of meta cannot point outside their group), anything it rejects goes
# through the validated wrapper, which names the problem.
_semi24_linear = direct_op("semi24_linear") or torch.ops.pycompress.semi24_linear.default
_CALL_ERRORS = (RuntimeError, TypeError, ValueError)


class SemiSparseLinear(nn.Module):
    """``y = x @ W.T + bias`` with a 2:4 sparse ``W`` (at most 2 of every 4 consecutive inputs of
    each output row kept), stored as plain buffers (format: :mod:`pycompress.ops.semi24`):

    * ``values`` ``[out_features, Kp/2]`` (float32, float16 or bfloat16; ``Kp`` = ``in_features``
      rounded up to a multiple of 32)
    * ``meta`` int16 ``[ceil(out_features/16), Kp/32, 32]`` (2-bit positions, in the order the
      sparse tensor cores read them)
    * ``bias`` ``[out_features]`` in the dtype of ``values`` (optional)

    CPU: gather kernel (AVX2/scalar), fp32 accumulation. CUDA: sparse tensor cores (sm_80+) with
    fp16/bf16 values (``.half()`` / ``.bfloat16()`` or ``from_dense(..., dtype=...)``; float32
    values are rounded to bf16 on each call). Outputs are in the dtype of ``x``.

    Example:
        >>> import torch, pycompress
        >>> from pycompress.nn import SemiSparseLinear
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32))
        >>> _ = pycompress.prune(model, None, pattern="2:4")
        >>> layer = SemiSparseLinear.from_dense(model[0])
        >>> x = torch.randn(3, 64)
        >>> torch.allclose(layer(x), model[0](x), atol=1e-5)
        True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        kp = semi24_ops.semi24_padded_k(in_features)
        self.register_buffer("values", torch.zeros(out_features, kp // 2, dtype=dtype, device=device))
        meta = torch.full(semi24_ops.semi24_meta_shape(out_features, in_features), 0x4444, dtype=torch.int16,
                          device=device)
        self.register_buffer("meta", meta)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    @torch.no_grad()
    def from_dense(cls, linear: nn.Module, mask: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> "SemiSparseLinear":
        """Compresses ``linear`` (an ``nn.Linear`` or a ``MaskedLinear``). ``mask`` (bool, the
        weight's shape, True = kept) must be 2:4 along the input dimension; ``None`` uses the
        MaskedLinear's own mask, or the nonzero weights. ``dtype``: dtype of the stored values and
        bias (default: the weight's). Raises ValueError naming the first row/group that keeps
        more than 2 of 4."""
        w, mask = dense_weight_and_mask(linear, mask)
        dtype = w.dtype if dtype is None else dtype
        values, meta = semi24_ops.semi24_compress(w, mask, dtype)
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=dtype,
                device=w.device)
        m.values.copy_(values)
        m.meta.copy_(meta)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().to(dtype))
        return m

    @property
    def nnz_capacity(self) -> int:
        """Number of stored weights (half of the padded dense weight)."""
        return int(self.values.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain_eager(x):
            b = self._buffers
            try:
                if x.dim() == 2:
                    return _semi24_linear(x, b["values"], b["meta"], b.get("bias"), self.in_features)
                if x.dim() >= 1 and x.shape[-1] == self.in_features:
                    y = _semi24_linear(x.reshape(-1, self.in_features), b["values"], b["meta"], b.get("bias"),
                                       self.in_features)
                    return y.reshape(*x.shape[:-1], self.out_features)
            except _CALL_ERRORS:
                pass  # the validated call below raises the error that names the problem
        return semi24_ops.semi24_linear(x, self.values, self.meta, self.bias, self.in_features)

    def config(self) -> dict:
        return {"type": "SemiSparseLinear", "format": "semi24", "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": str(self.values.dtype).replace("torch.", "")}

    @classmethod
    def from_config(cls, cfg: dict) -> "SemiSparseLinear":
        if not isinstance(cfg, dict):
            raise TypeError(f"cfg must be a dict, got {type(cfg).__name__}")
        if cfg.get("format", "semi24") != "semi24":
            raise ValueError(f"unknown SemiSparseLinear format {cfg.get('format')!r}")
        name = cfg.get("dtype", "float32")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, got {name!r}")
        return cls(int(cfg["in_features"]), int(cfg["out_features"]), bias=bool(cfg.get("bias", True)),
                   dtype=_DTYPE_NAMES[name])

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` (dtype of ``values``) holding the weights with their zeros."""
        return linear_from_weight(semi24_ops.semi24_decompress(self.values, self.meta, self.in_features), self.bias)

    to_float = to_dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format=2:4/{str(self.values.dtype).replace('torch.', '')}")
