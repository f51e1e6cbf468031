"""Sparse ops: CSR sparse x dense linear (SparseLinear) and the fused masked linear
(MaskedLinear), as validated wrappers over ``torch.ops.pycompress.*`` with fake kernels and
autograd.

CSR format of ``sparse_linear`` (output rows are the compressed dimension):

* ``row_ptr``: int32 ``[N + 1]``; the kept weights of output row ``n`` are entries
  ``row_ptr[n] .. row_ptr[n + 1]``
* ``col_idx``: int16 (``in_features <= 32768``) or int32 ``[nnz]``: input column of each entry
* ``values``: float32 ``[nnz]``

Single-token calls (``M == 1``) on AVX2 and AVX-512 CPUs run fastest on a second copy of a
layer's kept weights laid out for one token: row-sliced (SELL-8: rows sorted by length in windows
of 256, eight rows per SIMD vector) on AVX2, column-chunked (16 rows per vector, inputs picked
from 31-column chunks by register permutes) on AVX-512 where its cost model expects a gain. They
make decode steps about 1.2x (sliced) to 2x (chunked) faster and cost about as much memory again
as the layer's CSR arrays. :func:`sparse_decode_layout` builds that copy as one ``uint8`` tensor
(for the CPU ISA active when it is built, see :func:`pycompress.set_cpu_isa`), after checking the
CSR arrays completely; passed as ``layout`` to :func:`sparse_linear` it is used only while it is
current: built from these very tensors, none of them changed in place since (their version
counters are recorded). A stale layout is ignored (the call runs on the CSR arrays, checked
again), never wrong. A current layout also vouches for the arrays' structure, so calls with it
skip the per-call structural check. ``SparseLinear`` keeps its layout as the non-persistent buffer
``decode_layout``.
"""

from __future__ import annotations

import torch

from pycompress import _ext  # noqa: F401  (loads the kernels)
from pycompress.ops._validation import (FLOAT_DTYPES, check_device_supported, check_same_device, check_tensor,
                                        same_device_fake)

__all__ = ["sparse_linear", "masked_linear", "dense_to_csr", "csr_to_dense", "check_csr", "sparse_decode_layout",
           "sparse_decode_layout_info"]


# ----------------------------------------------------------------------------- decode layout
_LAYOUT_KINDS = {-1: None, 0: "checked", 1: "sliced", 2: "chunked"}


def sparse_decode_layout(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                         in_features: int, pack: bool = True) -> torch.Tensor:
    """Checks CSR arrays completely and returns their single-token layout (see module doc).

    CPU: a flat ``uint8`` tensor, the chunked layout on AVX-512 CPUs where it pays, else the
    sliced one (AVX2 and up); with ``pack=False``, on scalar CPUs, or for inference tensors, only a
    header that records the checked arrays (calls with it skip the structural check). Build it
    again after changing the arrays in place or switching the CPU ISA. CUDA: the check only (one
    host synchronization); the layout is an empty tensor (the CUDA kernel needs none).

    Example:
        >>> import torch, pycompress.ops as ops
        >>> w = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
        >>> rp, ci, v = ops.dense_to_csr(w)
        >>> layout = ops.sparse_decode_layout(rp, ci, v, 3)
        >>> ops.sparse_linear(torch.ones(1, 3), rp, ci, v, None, 3, layout=layout).tolist()
        [[2.0, 4.0]]
    """
    _check_csr_args(row_ptr, col_idx, values, in_features)
    device = check_same_device(row_ptr=row_ptr, col_idx=col_idx, values=values)
    check_device_supported(device, "sparse_decode_layout")
    if not isinstance(pack, bool):
        raise TypeError(f"pack must be a bool, got {pack!r}")
    return torch.ops.pycompress.sparse_decode_layout(row_ptr, col_idx, values, in_features, pack)


def sparse_decode_layout_info(layout: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                              values: torch.Tensor, in_features: int) -> dict:
    """``{"kind", "bytes", "current"}`` of a layout from :func:`sparse_decode_layout`: ``kind`` is
    ``"chunked"``, ``"sliced"``, ``"checked"`` (header only) or None (an empty tensor), ``bytes`` its
    size, ``current`` whether :func:`sparse_linear` would use it with these arrays."""
    check_tensor("layout", layout, dtypes=(torch.uint8,), ndim=1)
    _check_csr_args(row_ptr, col_idx, values, in_features)
    check_same_device(layout=layout, row_ptr=row_ptr, col_idx=col_idx, values=values)
    if layout.device.type != "cpu":
        return {"kind": None, "bytes": 0, "current": False}
    kind, nbytes, current = torch.ops.pycompress.sparse_decode_layout_info(layout, row_ptr, col_idx, values,
                                                                           in_features)
    return {"kind": _LAYOUT_KINDS.get(int(kind)), "bytes": int(nbytes), "current": bool(current)}


def check_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, in_features: int) -> None:
    """Raises when the arrays are not a valid CSR weight with ``in_features`` columns (dtypes and
    shapes: TypeError / ValueError; structure: RuntimeError naming the problem), as
    :func:`sparse_decode_layout` checks them (host synchronizations on CUDA)."""
    _check_csr_args(row_ptr, col_idx, values, in_features)
    device = check_same_device(row_ptr=row_ptr, col_idx=col_idx, values=values)
    check_device_supported(device, "check_csr")
    if device.type != "meta":
        torch.ops.pycompress.sparse_decode_layout(row_ptr, col_idx, values, in_features, False)


def _check_csr_args(row_ptr, col_idx, values, in_features) -> None:
    check_tensor("row_ptr", row_ptr, dtypes=(torch.int32,), ndim=1)
    check_tensor("col_idx", col_idx, dtypes=(torch.int16, torch.int32), ndim=1)
    check_tensor("values", values, dtypes=(torch.float32,), ndim=1)
    if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 0:
        raise TypeError(f"in_features must be a non-negative int, got {in_features!r}")
    if row_ptr.numel() < 1:
        raise ValueError("row_ptr must have N + 1 >= 1 entries")
    if values.numel() != col_idx.numel():
        raise ValueError(f"values ({values.numel()}) and col_idx ({col_idx.numel()}) must have the same length")
    if col_idx.dtype == torch.int16 and in_features > 32768:
        raise ValueError("int16 col_idx supports in_features <= 32768; use int32")


# ----------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("pycompress::sparse_linear")
def _sparse_linear_fake(x, row_ptr, col_idx, values, bias, in_features, layout=None):
    torch._check(x.dim() == 2, lambda: "sparse_linear: x must be 2-D")
    torch._check(x.shape[1] == in_features, lambda: "sparse_linear: x.shape[1] != in_features")
    same_device_fake("sparse_linear", x, row_ptr, col_idx, values, bias)
    return x.new_empty((x.shape[0], row_ptr.shape[0] - 1))


@torch.library.register_fake("pycompress::sparse_decode_layout")
def _sparse_decode_layout_fake(row_ptr, col_idx, values, in_features, pack=True):
    return row_ptr.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)


@torch.library.register_fake("pycompress::masked_linear")
def _masked_linear_fake(x, weight, mask, bias):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "masked_linear: 2-D inputs expected")
    torch._check(x.shape[1] == weight.shape[1], lambda: "masked_linear: x.shape[1] != weight.shape[1]")
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("pycompress::masked_linear_grad_input")
def _masked_linear_grad_input_fake(grad, weight, mask):
    return grad.new_empty((grad.shape[0], weight.shape[1]))


@torch.library.register_fake("pycompress::masked_linear_grad_weight")
def _masked_linear_grad_weight_fake(grad, x, mask):
    return x.new_empty((mask.shape[0], mask.shape[1]))


# ----------------------------------------------------------------------------- autograd
def _masked_setup_context(ctx, inputs, output):
    x, weight, mask, bias = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _masked_backward(ctx, grad):
    x, weight, mask = ctx.saved_tensors
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.pycompress.masked_linear_grad_input(grad, weight, mask).to(x.dtype)
    if ctx.needs_input_grad[1]:
        gw = torch.ops.pycompress.masked_linear_grad_weight(grad, x, mask).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = grad.sum(0).to(ctx.bias_dtype)
    return gx, gw, None, gb


torch.library.register_autograd(
    "pycompress::masked_linear", _masked_backward, setup_context=_masked_setup_context
)


# ----------------------------------------------------------------------------- wrappers
def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * mask).T + bias`` with the mask applied inside the kernel.

    No masked copy of the weight is made. The gradient of ``weight`` is exactly zero where
    ``mask`` is False; the gradient of ``x`` uses the masked weight.

    Args:
        x: float tensor ``[..., K]``.
        weight: float tensor ``[N, K]`` (same dtype as ``x``).
        mask: bool tensor ``[N, K]``.
        bias: optional float tensor ``[N]``.

    Returns:
        Tensor ``[..., N]`` of the dtype of ``x``.

    Example:
        >>> import torch, pycompress.ops as ops
        >>> w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> m = torch.tensor([[True, False], [False, True]])
        >>> ops.masked_linear(torch.tensor([[1.0, 1.0]]), w, m).tolist()
        [[1.0, 4.0]]
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("mask", mask, dtypes=(torch.bool,), ndim=2)
    if mask.shape != weight.shape:
        raise ValueError(f"mask must have the shape of weight {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have {weight.shape[1]} features in its last dimension, got {x.shape[-1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have {weight.shape[0]} elements, got {bias.shape[0]}")
    device = check_same_device(x=x, weight=weight, mask=mask, bias=bias)
    check_device_supported(device, "masked_linear")
    lead = x.shape[:-1]
    y = torch.ops.pycompress.masked_linear(x.reshape(-1, x.shape[-1]), weight, mask, bias)
    return y.reshape(*lead, weight.shape[0])


def sparse_linear(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                  bias: torch.Tensor | None, in_features: int, *, layout: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a weight ``W [N, in_features]`` stored in CSR (see module doc).

    Args:
        x: float tensor ``[..., in_features]`` (fp16/bf16 are computed in fp32).
        row_ptr, col_idx, values: the CSR arrays (e.g. from :func:`dense_to_csr`); their structure
            is checked on every call (unless ``layout`` vouches for them).
        bias: optional float32 ``[N]``.
        in_features: number of input columns ``K``.
        layout: optional result of :func:`sparse_decode_layout` for these arrays (CPU): used for
            single-token calls while it is current, ignored otherwise.

    Returns:
        Tensor ``[..., N]`` of the dtype of ``x``. Only ``x`` gets a gradient.

    Example:
        >>> import torch, pycompress.ops as ops
        >>> w = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
        >>> rp, ci, v = ops.dense_to_csr(w)
        >>> ops.sparse_linear(torch.ones(1, 3), rp, ci, v, None, 3).tolist()
        [[2.0, 4.0]]
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    _check_csr_args(row_ptr, col_idx, values, in_features)
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features={in_features} in its last dimension, got {x.shape[-1]}")
    n_out = row_ptr.numel() - 1
    if bias is not None:
        check_tensor("bias", bias, dtypes=(torch.float32,), ndim=1)
        if bias.shape[0] != n_out:
            raise ValueError(f"bias must have {n_out} elements, got {bias.shape[0]}")
    device = check_same_device(x=x, row_ptr=row_ptr, col_idx=col_idx, values=values, bias=bias)
    check_device_supported(device, "sparse_linear")
    if layout is not None:
        check_tensor("layout", layout, dtypes=(torch.uint8,), ndim=1)
        if device.type != "cpu" or layout.device.type != "cpu":
            layout = None  # a CPU layout; other devices run on the CSR arrays
    if device.type == "cuda" and not torch.compiler.is_compiling():
        # the CUDA kernel does not check the structure per call (host synchronizations)
        check_csr(row_ptr, col_idx, values, in_features)
    lead = x.shape[:-1]
    y = torch.ops.pycompress.sparse_linear(x.reshape(-1, in_features), row_ptr, col_idx, values, bias,
                                           in_features, layout)
    return y.reshape(*lead, n_out)


def resolve_index_dtype(index_dtype: torch.dtype | None, in_features: int) -> torch.dtype:
    """The column-index dtype of a CSR weight with ``in_features`` columns: ``index_dtype`` checked,
    or int16 when the columns fit (``in_features <= 32768``) and int32 otherwise."""
    if index_dtype is None:
        index_dtype = torch.int16 if in_features <= 32768 else torch.int32
    if index_dtype not in (torch.int16, torch.int32):
        raise TypeError(f"index_dtype must be torch.int16 or torch.int32, got {index_dtype}")
    if index_dtype == torch.int16 and in_features > 32768:
        raise ValueError("int16 column indices need in_features <= 32768")
    return index_dtype


def dense_to_csr(weight: torch.Tensor, mask: torch.Tensor | None = None,
                 index_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compresses ``weight [N, K]`` (kept where ``mask``, or where nonzero) into
    ``(row_ptr int32, col_idx int16|int32, values float32)``.

    ``index_dtype`` defaults to int16 when ``K <= 32768``, else int32.
    """
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    N, K = weight.shape
    if mask is None:
        mask = weight != 0
    else:
        check_tensor("mask", mask, dtypes=(torch.bool,), ndim=2)
        if mask.shape != weight.shape:
            raise ValueError(f"mask must have the shape of weight {tuple(weight.shape)}, got {tuple(mask.shape)}")
    index_dtype = resolve_index_dtype(index_dtype, K)
    mask = mask.to(weight.device)
    counts = mask.sum(1, dtype=torch.int64)
    if int(counts.sum()) >= 2**31:
        raise ValueError("too many kept weights for int32 row pointers")
    row_ptr = torch.zeros(N + 1, dtype=torch.int32, device=weight.device)
    row_ptr[1:] = counts.cumsum(0).to(torch.int32)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order, columns ascending
    values = weight[rows, cols].to(torch.float32).contiguous()
    return row_ptr, cols.to(index_dtype).contiguous(), values


def csr_to_dense(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                 in_features: int) -> torch.Tensor:
    """Inverse of :func:`dense_to_csr`: the float32 weight ``[N, in_features]`` with zeros."""
    n_out = row_ptr.numel() - 1
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(n_out, device=row_ptr.device), counts)
    w = torch.zeros(n_out, in_features, dtype=torch.float32, device=values.device)
    w[rows, col_idx.to(torch.int64)] = values
    return w
