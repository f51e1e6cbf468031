"""SparseLinear: an inference linear layer that stores only the kept weights (CSR)."""

from __future__ import annotations

import os

import torch
from torch import nn

from pycompress._ext import direct_op, plain_eager
from pycompress.nn._common import linear_from_weight
from pycompress.nn.masked_linear import dense_weight_and_mask
from pycompress.ops import sparse as sparse_ops

__all__ = ["SparseLinear"]

_INDEX_DTYPES = {"int16": torch.int16, "int32": torch.int32}
# The hot path of forward calls the op itself, through its typed entry point for plain tensors
# (pycompress._ext.direct_op): the module's buffers were checked when they were set (relayout),
# the op checks shapes, dtypes and devices in C++, and anything it rejects goes through the
# validated wrapper, which names the problem.
_sparse_linear = direct_op("sparse_linear") or torch.ops.pycompress.sparse_linear.default
_CALL_ERRORS = (RuntimeError, TypeError, ValueError)


def _decode_layout_default() -> bool:
    return os.environ.get("PYCOMPRESS_SPARSE_DECODE_LAYOUT", "1").strip().lower() not in ("0", "off", "false")


class SparseLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` stored in CSR over output rows as plain buffers:

    * ``row_ptr`` int32 ``[out_features + 1]``
    * ``col_idx`` int16 (``in_features <= 32768``) or int32 ``[nnz]``
    * ``values`` float32 ``[nnz]``
    * ``bias`` float32 ``[out_features]`` (optional)

    At 90% sparsity the buffers take about 15% of the dense fp32 weight (6 bytes per kept
    weight). Outputs equal the dense layer with the zeros up to fp32 rounding; fp16/bf16 inputs
    are computed in fp32 and returned in their dtype.

    On the CPU the layer also keeps its single-token layout (:func:`pycompress.ops.sparse_decode_layout`)
    in the non-persistent buffer ``decode_layout``, about as large again as the CSR arrays; it is
    built for the CPU ISA active at the time, whenever the buffers are set (``from_dense``,
    ``load_state_dict``, ``.to()``, unpickling), which also checks their structure once. After
    editing the buffers in place or calling :func:`pycompress.set_cpu_isa`, call :meth:`relayout`:
    until then single-token calls run on the CSR arrays (checked per call; the results stay
    right). :meth:`set_decode_layout` ``(False)`` (or ``PYCOMPRESS_SPARSE_DECODE_LAYOUT=0`` for new
    layers) keeps only a header that records the checked arrays.

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
        # the buffers are placeholders until from_dense / load_state_dict set them
        self._pack_decode_layout = _decode_layout_default()
        self.register_buffer("decode_layout", torch.empty(0, dtype=torch.uint8, device=device), persistent=False)
        self.register_load_state_dict_post_hook(SparseLinear._after_load)

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
        m.relayout()
        return m

    # ------------------------------------------------------------------ decode layout

    @torch.no_grad()
    def relayout(self) -> None:
        """Checks the CSR buffers (raising on a corrupt structure) and rebuilds ``decode_layout``
        for the CPU ISA active now (CUDA: checks only, the layout stays empty)."""
        rp, ci, v = self.row_ptr, self.col_idx, self.values
        if rp.device.type == "meta":
            layout = torch.empty(0, dtype=torch.uint8, device=rp.device)
        else:
            with torch.inference_mode(False):  # a layout must be able to record version counters
                layout = sparse_ops.sparse_decode_layout(rp, ci, v, self.in_features, pack=self._pack_decode_layout)
        self.decode_layout = layout

    def _relayout_or_drop(self) -> None:
        # buffers set by loading or moving: a structure that does not check leaves no layout, and
        # the calls raise the error (the structure is then checked per call)
        try:
            self.relayout()
        except (RuntimeError, TypeError, ValueError):
            self.decode_layout = torch.empty(0, dtype=torch.uint8, device=self.row_ptr.device)

    def set_decode_layout(self, enabled: bool) -> bool:
        """Keeps the single-token copy of the weights (True, the default) or only the header that
        records the checked buffers (False); returns the previous setting."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        before, self._pack_decode_layout = self._pack_decode_layout, enabled
        self.relayout()
        return before

    def decode_layout_info(self) -> dict:
        """``{"enabled", "kind", "bytes", "current"}``: whether the single-token copy is kept, the kind
        of layout held (``"chunked"``, ``"sliced"``, ``"checked"`` or None), its size in bytes, and
        whether the calls use it (False after the buffers changed in place: call :meth:`relayout`)."""
        info = sparse_ops.sparse_decode_layout_info(self.decode_layout, self.row_ptr, self.col_idx, self.values,
                                                    self.in_features)
        return {"enabled": self._pack_decode_layout, **info}

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        module._relayout_or_drop()

    def _apply(self, fn, recurse=True):
        before = [(t, t.data_ptr() if t.device.type == "cpu" else 0)
                  for t in (self.row_ptr, self.col_idx, self.values)]
        moved = super()._apply(fn, recurse)
        after = (self.row_ptr, self.col_idx, self.values)
        if any(t is not old or (t.device.type == "cpu" and t.data_ptr() != ptr)
               for t, (old, ptr) in zip(after, before)) or self.decode_layout.device != self.row_ptr.device:
            self._relayout_or_drop()
        return moved

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_pack_decode_layout", _decode_layout_default())
        if "decode_layout" not in self._buffers:
            self.register_buffer("decode_layout", torch.empty(0, dtype=torch.uint8), persistent=False)
        self._relayout_or_drop()  # unpickled or deep-copied buffers: new tensors

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        total = self.in_features * self.out_features
        return 1.0 - self.nnz / total if total else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain_eager(x):
            b = self._buffers
            try:
                if x.dim() == 2:
                    return _sparse_linear(x, b["row_ptr"], b["col_idx"], b["values"], b.get("bias"),
                                          self.in_features, b["decode_layout"])
                if x.dim() >= 1 and x.shape[-1] == self.in_features:
                    y = _sparse_linear(x.reshape(-1, self.in_features), b["row_ptr"], b["col_idx"], b["values"],
                                       b.get("bias"), self.in_features, b["decode_layout"])
                    return y.reshape(*x.shape[:-1], self.out_features)
            except _CALL_ERRORS:
                pass  # the validated call below raises the error that names the problem
        return sparse_ops.sparse_linear(x, self.row_ptr, self.col_idx, self.values, self.bias, self.in_features,
                                        layout=self.decode_layout)

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
