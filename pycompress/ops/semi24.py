"""2:4 semi-structured sparsity: compression of 2:4 weights and the sparse linear product, as
validated wrappers over ``torch.ops.pycompress.semi24_*`` with fake kernels.

A weight ``W [N, K]`` is 2:4 sparse when every group of 4 consecutive inputs
(``k = 4j .. 4j+3``) of each output row keeps at most 2 weights. ``K`` is padded with zeros to
``Kp``, a multiple of 32 (one k-step of the sparse tensor core instruction ``mma.sp m16n8k32``).

* ``values``: ``[N, Kp/2]`` float32/float16/bfloat16; ``values[n, 2j]`` and ``values[n, 2j+1]``
  are the kept weights of group ``j`` (lower, then higher position).
* ``meta``: int16 ``[ceil(N/16), Kp/32, 32]``: 2-bit positions, ``i0 | i1 << 2`` per group
  (``i0 < i1``), four groups per 16-bit word, stored in the order of the metadata registers of
  ``mma.sp m16n8k32`` (sparsity selector 0) so the CUDA kernel loads them unchanged:
  ``meta[nt, kt, 2 * (2g + t) + h]`` is the word of row ``16 nt + g + 8 h`` for the logical
  columns ``32 kt + 16 t .. + 15`` (``g < 8``, ``t, h < 2``).

The CPU kernel gathers activations along the kept positions (AVX2 or scalar); the CUDA kernel
runs on sparse tensor cores (sm_80+, fp16/bf16; fp32 values are rounded to bf16 per call).
"""

from __future__ import annotations

import torch

from pycompress import _ext  # noqa: F401  (loads the kernels)
from pycompress.ops._validation import (FLOAT_DTYPES, check_device_supported, check_same_device, check_tensor,
                                        same_device_fake)

__all__ = ["semi24_compress", "semi24_decompress", "semi24_linear", "check_semi24", "semi24_padded_k",
           "semi24_meta_shape"]


def semi24_padded_k(in_features: int) -> int:
    """``K`` rounded up to a multiple of 32 (the padded input width of the compressed format)."""
    return (in_features + 31) // 32 * 32


def semi24_meta_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    """Shape of the ``meta`` buffer for a ``[out_features, in_features]`` weight."""
    return ((out_features + 15) // 16, semi24_padded_k(in_features) // 32, 32)


# ----------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("pycompress::semi24_compress")
def _semi24_compress_fake(weight, mask, dtype):
    torch._check(weight.dim() == 2, lambda: "semi24_compress: weight must be 2-D")
    n, k = weight.shape
    kp = (k + 31) // 32 * 32
    values = weight.new_empty((n, kp // 2), dtype=dtype if dtype is not None else weight.dtype)
    meta = weight.new_empty(((n + 15) // 16, kp // 32, 32), dtype=torch.int16)
    return values, meta


@torch.library.register_fake("pycompress::semi24_decompress")
def _semi24_decompress_fake(values, meta, in_features):
    return values.new_empty((values.shape[0], in_features))


@torch.library.register_fake("pycompress::semi24_linear")
def _semi24_linear_fake(x, values, meta, bias, in_features):
    torch._check(x.dim() == 2, lambda: "semi24_linear: x must be 2-D")
    torch._check(x.shape[1] == in_features, lambda: "semi24_linear: x.shape[1] != in_features")
    same_device_fake("semi24_linear", x, values, meta, bias)
    return x.new_empty((x.shape[0], values.shape[0]))


# ----------------------------------------------------------------------------- wrappers
def check_semi24(keep: torch.Tensor, name: str = "mask") -> None:
    """Raises ValueError naming the first row and group of ``keep`` (bool ``[N, K]``: True = kept)
    that keeps more than 2 of 4 consecutive inputs."""
    check_tensor(name, keep, dtypes=(torch.bool,), ndim=2)
    n, k = keep.shape
    if n == 0 or k == 0:
        return
    k4 = (k + 3) // 4 * 4
    padded = torch.nn.functional.pad(keep.to(torch.int8), (0, k4 - k))
    counts = padded.view(n, k4 // 4, 4).sum(-1)
    bad = (counts > 2).nonzero()
    if bad.numel():
        row, group = int(bad[0, 0]), int(bad[0, 1])
        cols = list(range(4 * group, min(4 * group + 4, k)))
        raise ValueError(
            f"{name} is not 2:4 sparse along the input dimension: row {row}, group {group} "
            f"(columns {cols[0]}..{cols[-1]}) keeps {int(counts[row, group])} of 4 "
            f"(at most 2 allowed); prune with pattern='2:4' first")


def semi24_compress(weight: torch.Tensor, mask: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compresses a 2:4 sparse weight ``[N, K]`` into ``(values, meta)`` (see module doc).

    Args:
        weight: float tensor ``[N, K]``.
        mask: optional bool ``[N, K]`` (True = kept); default: the nonzero weights.
        dtype: dtype of ``values`` (default: the weight's); float16/bfloat16 for tensor cores.

    Runs once at conversion time (on the CPU); the buffers come back on the weight's device.

    Example:
        >>> import torch, pycompress.ops as ops
        >>> w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
        >>> values, meta = ops.semi24_compress(w)
        >>> values.shape, meta.shape
        (torch.Size([1, 16]), torch.Size([1, 1, 32]))
        >>> torch.equal(ops.semi24_decompress(values, meta, 8), w)
        True
    """
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), ndim=2)
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
        check_semi24(mask.detach().cpu(), "mask")
    else:
        check_semi24((weight.detach() != 0).cpu(), "weight")
    w = weight.detach().cpu()
    m = mask.detach().cpu() if mask is not None else None
    values, meta = torch.ops.pycompress.semi24_compress(w, m, dtype)
    return values.to(weight.device), meta.to(weight.device)


def _check_buffers(values, meta, in_features):
    check_tensor("values", values, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("meta", meta, dtypes=(torch.int16,), ndim=3)
    if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 0:
        raise TypeError(f"in_features must be a non-negative int, got {in_features!r}")
    kp = semi24_padded_k(in_features)
    if values.shape[1] != kp // 2:
        raise ValueError(f"values must have {kp // 2} columns for in_features={in_features}, got {values.shape[1]}")
    expected = semi24_meta_shape(values.shape[0], in_features)
    if tuple(meta.shape) != expected:
        raise ValueError(f"meta must have shape {expected}, got {tuple(meta.shape)}")


def semi24_decompress(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense weight ``[N, in_features]`` (dtype of ``values``) with its zeros."""
    _check_buffers(values, meta, in_features)
    check_same_device(values=values, meta=meta)
    out = torch.ops.pycompress.semi24_decompress(values.detach().cpu(), meta.detach().cpu(), in_features)
    return out.to(values.device)


def semi24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                  in_features: int) -> torch.Tensor:
    """``x @ W.T + bias`` for a 2:4 sparse weight given by ``values``/``meta`` (see module doc).

    Args:
        x: float tensor ``[..., in_features]``.
        values, meta: from :func:`semi24_compress`.
        bias: optional float ``[N]``.
        in_features: ``K``.

    Returns:
        Tensor ``[..., N]`` in the dtype of ``x`` (accumulated in fp32).

    Example:
        >>> import torch, pycompress.ops as ops
        >>> w = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
        >>> values, meta = ops.semi24_compress(w)
        >>> ops.semi24_linear(torch.ones(1, 4), values, meta, None, 4).tolist()
        [[3.0, 3.0]]
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    _check_buffers(values, meta, in_features)
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features={in_features} in its last dimension, got {x.shape[-1]}")
    n_out = values.shape[0]
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != n_out:
            raise ValueError(f"bias must have {n_out} elements, got {bias.shape[0]}")
    device = check_same_device(x=x, values=values, meta=meta, bias=bias)
    check_device_supported(device, "semi24_linear")
    if device.type == "cuda" and not _ext.op_has_cuda_kernel("pycompress::semi24_linear"):
        raise RuntimeError("pycompress.ops.semi24_linear: this build has no CUDA kernel for semi24_linear")
    lead = x.shape[:-1]
    y = torch.ops.pycompress.semi24_linear(x.reshape(-1, in_features), values, meta, bias, in_features)
    return y.reshape(*lead, n_out)
