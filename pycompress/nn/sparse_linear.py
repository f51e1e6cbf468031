"""SparseLinear: an inference linear layer that stores only the kept weights (CSR)."""

from __future__ import annotations

import torch
from torch import nn

from pycompress import _C
from pycompress.nn._common import linear_from_weight
from pycompress.nn.masked_linear import dense_weight_and_mask
from pycompress.ops import sparse as sparse_ops

__all__ = ["SparseLinear"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = {"int16": torch.int16, "int32": torch.int32}
_sparse_linear_op = torch.ops.pycompress.sparse_linear.default
_BelowAutograd = torch._C._AutoDispatchBelowAutograd
# Plain CPU inference calls the kernel directly (pycompress._C.sparse_linear_module_cpu): without
# the dispatcher and the op's Python wrapper a call costs ~2.5 us less, a tenth of a single-token
# product. It checks everything in C++ and returns None whenever the call must be seen by
# something (grad, dispatch or torch-function modes, functorch transforms, the tracer) or the
# input is unusual; the profiler still records it.
_module_cpu = getattr(_C, "sparse_linear_module_cpu", None)


class SparseLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` stored in CSR over output rows as plain buffers:

    * ``row_ptr`` int32 ``[out_features + 1]``
    * ``col_idx`` int16 (``in_features <= 32768``) or int32 ``[nnz]``
    * ``values`` float32 ``[nnz]``
    * ``bias`` float32 ``[out_features]`` (optional)

    At 90% sparsity the buffers take about 15% of the dense fp32 weight (6 bytes per kept
    weight). Outputs equal the dense layer with the zeros up to fp32 rounding; fp16/bf16 inputs
    are computed in fp32 and returned in their dtype.

    Example:
        >>> import torch
        >>> from pycompress.nn import SparseLinear
        >>> lin = torch.nn.Linear(8, 4)
        >>> with torch.no_grad():
        ...     lin.weight[lin.weight.abs() < 0.2] = 0
        >>> sl = SparseLinear.from_dense(lin)
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(sl(x), lin(x), atol=1e-5)
        True
    """

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = True,
                 index_dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("nnz", nnz)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if nnz > in_features * out_features:
            raise ValueError(f"nnz={nnz} exceeds in_features * out_features = {in_features * out_features}")
        index_dtype = sparse_ops.resolve_index_dtype(index_dtype, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("col_idx", torch.zeros(nnz, dtype=index_dtype, device=device))
        self.register_buffer("values", torch.zeros(nnz, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None

    @classmethod
    @torch.no_grad()
    def from_dense(cls, linear: nn.Module, mask: torch.Tensor | None = None) -> "SparseLinear":
        """Compresses ``linear`` (an ``nn.Linear`` or a ``MaskedLinear``). ``mask=None`` keeps the
        nonzero weights (a MaskedLinear's own mask is used when it has one)."""
        w, mask = dense_weight_and_mask(linear, mask)
        row_ptr, col_idx, values = sparse_ops.dense_to_csr(w, mask)
        m = cls(linear.in_features, linear.out_features, int(values.numel()), bias=linear.bias is not None,
                index_dtype=col_idx.dtype, device=w.device)
        m.row_ptr.copy_(row_ptr)
        m.col_idx.copy_(col_idx)
        m.values.copy_(values)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        total = self.in_features * self.out_features
        return 1.0 - self.nnz / total if total else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers
        if _module_cpu is not None and not torch.compiler.is_compiling():
            y = _module_cpu(x, buffers, self.in_features)
            if y is not None:
                return y
        # The buffers are checked by the kernel itself (once per buffer version); only the input
        # is validated here. Anything unusual goes through the validated op wrapper, which raises
        # clear errors.
        values = buffers["values"]
        bias = buffers["bias"] if "bias" in buffers else None
        device = values.device
        if (type(x) is not torch.Tensor or x.dtype not in _FLOAT_DTYPES or x.dim() < 1
                or x.shape[-1] != self.in_features or x.device != device
                or buffers["row_ptr"].device != device or buffers["col_idx"].device != device
                or (bias is not None and bias.device != device)):
            return sparse_ops.sparse_linear(x, buffers["row_ptr"], buffers["col_idx"], values, bias,
                                            self.in_features)
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, self.in_features)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))
        if needs_grad or torch.compiler.is_compiling():
            y = _sparse_linear_op(x2, buffers["row_ptr"], buffers["col_idx"], values, bias,
                                  self.in_features)
        else:
            # no gradient needed: call the device kernel directly, skipping the Python autograd
            # wrapper of the op (tens of microseconds, as much as the whole product at M=1)
            with _BelowAutograd():
                y = _sparse_linear_op(x2, buffers["row_ptr"], buffers["col_idx"], values, bias,
                                      self.in_features)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def config(self) -> dict:
        return {"type": "SparseLinear", "format": "csr", "in_features": self.in_features,
                "out_features": self.out_features, "nnz": self.nnz, "bias": self.bias is not None,
                "index_dtype": str(self.col_idx.dtype).replace("torch.", "")}

    @classmethod
    def from_config(cls, cfg: dict) -> "SparseLinear":
        if not isinstance(cfg, dict):
            raise TypeError(f"cfg must be a dict, got {type(cfg).__name__}")
        if cfg.get("format", "csr") != "csr":
            raise ValueError(f"unknown SparseLinear format {cfg.get('format')!r}")
        idx = cfg.get("index_dtype")
        if idx is not None and idx not in _INDEX_DTYPES:
            raise ValueError(f"index_dtype must be int16 or int32, got {idx!r}")
        return cls(int(cfg["in_features"]), int(cfg["out_features"]), int(cfg["nnz"]),
                   bias=bool(cfg.get("bias", True)), index_dtype=_INDEX_DTYPES.get(idx))

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """A plain float32 ``nn.Linear`` holding the weights with their zeros."""
        return linear_from_weight(sparse_ops.csr_to_dense(self.row_ptr, self.col_idx, self.values, self.in_features),
                                  self.bias)

    to_float = to_dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nnz={self.nnz}, sparsity={100 * self.sparsity:.1f}%, "
                f"format=csr/{str(self.col_idx.dtype).replace('torch.', '')}")
