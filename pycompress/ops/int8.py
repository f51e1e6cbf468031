"""Int8 ops: per-token quantization (and the int8 GEMM family).

Thin validated wrappers over ``torch.ops.pycompress.*`` plus their fake (meta)
kernels, so that ``torch.compile`` and ``torch.export`` can trace them.
"""

from __future__ import annotations

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
    "quantize_per_token",
    "int8_gemm",
    "int8_pack_weight",
    "int8_packed_bytes",
    "int8_linear",
    "int8_linear_w8a16",
]


@torch.library.register_fake("pycompress::quantize_per_token")
def _quantize_per_token_fake(x):
    torch._check(x.dim() == 2, lambda: "quantize_per_token: x must be 2-D")
    M, K = x.shape
    return x.new_empty((M, K), dtype=torch.int8), x.new_empty((M,), dtype=torch.float32)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token (per-row) int8 quantization.

    For every row of ``x`` (the last dimension is the row), ``scale = absmax / 127`` and
    ``q = clamp(round_half_even(x * (127 / absmax)), -127, 127)``, computed in fp32. Rows of
    zeros get ``scale = 1`` and ``q = 0``; rows holding NaN or ±inf get ``scale = NaN`` and
    ``q = 0`` so the problem stays visible after dequantization.

    Args:
        x: float32, float16 or bfloat16 tensor of shape ``[..., K]`` (at least 2-D; leading
            dimensions are rows). Non-contiguous rows are copied first.

    Returns:
        ``(q, scale)``: ``q`` int8 with the shape of ``x``; ``scale`` float32 of shape ``x.shape[:-1]``.
        ``q * scale[..., None]`` approximates ``x``.

    Example:
        >>> import torch, pycompress.ops as ops
        >>> q, s = ops.quantize_per_token(torch.tensor([[1.0, -2.0, 0.5]]))
        >>> q.tolist(), s.tolist()
        ([[64, -127, 32]], [0.015748031437397003])
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=2)
    check_device_supported(x.device, "quantize_per_token")
    if x.dim() == 2:
        return torch.ops.pycompress.quantize_per_token(x)
    lead = x.shape[:-1]
    q, s = torch.ops.pycompress.quantize_per_token(x.reshape(-1, x.shape[-1]))
    return q.reshape(x.shape), s.reshape(lead)


# --------------------------------------------------------------------------- int8 GEMM family


def int8_packed_bytes(n: int, k: int) -> int:
    """Size in bytes of the CPU packed form of an int8 ``[n, k]`` weight (see ``int8_pack_weight``)."""
    kp = (k + 3) // 4 * 4
    np_ = (n + 15) // 16 * 16
    return np_ * kp + 4 * np_ + np_ // 4


@torch.library.register_fake("pycompress::int8_gemm")
def _int8_gemm_fake(a, b):
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "int8_gemm: a and b must be 2-D")
    torch._check(a.shape[1] == b.shape[1], lambda: "int8_gemm: K mismatch")
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@torch.library.register_fake("pycompress::int8_pack_weight")
def _int8_pack_weight_fake(w):
    torch._check(w.dim() == 2, lambda: "int8_pack_weight: w must be 2-D")
    n, k = w.shape
    return w.new_empty((int8_packed_bytes(n, k),), dtype=torch.int8)


@torch.library.register_fake("pycompress::int8_linear")
def _int8_linear_fake(x, w, w_scale, bias=None, w_packed=None, act_bits=8):
    torch._check(x.dim() == 2, lambda: "int8_linear: x must be 2-D")
    torch._check(x.shape[1] == w.shape[1], lambda: "int8_linear: K mismatch")
    same_device_fake("int8_linear", x, w, w_scale, bias)
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.register_fake("pycompress::int8_linear_w8a16")
def _int8_linear_w8a16_fake(x, w, w_scale, bias=None):
    torch._check(x.dim() == 2, lambda: "int8_linear_w8a16: x must be 2-D")
    torch._check(x.shape[1] == w.shape[1], lambda: "int8_linear_w8a16: K mismatch")
    same_device_fake("int8_linear_w8a16", x, w, w_scale, bias)
    return x.new_empty((x.shape[0], w.shape[0]))


def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 matrix product ``a @ b.T`` with int32 accumulation.

    ``C[m, n] = sum_k a[m, k] * b[n, k]`` computed without any intermediate saturation
    (``-128 * -128 * K`` is exact); results wrap modulo 2**32 only when they do not fit in
    int32 (possible for K > 131072). Any M >= 0, K >= 1, N >= 1 (no alignment requirement);
    non-contiguous inputs are copied first. CPU: AVX-512 VNNI / AVX2 / scalar kernels chosen at
    run time; CUDA: ``mma.sync`` int8 tensor cores (sm_80+) or a GEMV kernel for small M.

    Args:
        a: int8 tensor ``[M, K]`` (activations).
        b: int8 tensor ``[N, K]`` (weights, one row per output column).

    Returns:
        int32 tensor ``[M, N]``.

    Example:
        >>> import torch, pycompress.ops as ops
        >>> a = torch.tensor([[1, -2, 3]], dtype=torch.int8)
        >>> b = torch.tensor([[4, 5, 6], [-128, -128, -128]], dtype=torch.int8)
        >>> ops.int8_gemm(a, b).tolist()
        [[12, -256]]
    """
    check_tensor("a", a, dtypes=(torch.int8,), ndim=2)
    check_tensor("b", b, dtypes=(torch.int8,), ndim=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a is [M, K] and b is [N, K] with the same K; got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.shape[1] < 1 or b.shape[0] < 1:
        raise ValueError(f"int8_gemm needs K >= 1 and N >= 1, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    device = check_same_device(a=a, b=b)
    check_device_supported(device, "int8_gemm")
    return torch.ops.pycompress.int8_gemm(a, b)


def int8_pack_weight(w: torch.Tensor) -> torch.Tensor:
    """Packs an int8 ``[N, K]`` weight once into the blocked layout of the CPU GEMM kernels.

    The result (a flat int8 tensor of ``int8_packed_bytes(N, K)`` bytes: 16-column panels with
    K in groups of 4, followed by int32 column sums and each panel's largest ``|w|``) can be
    passed as ``w_packed`` to :func:`int8_linear` so that the weight is not re-packed on every
    call. CPU tensors only.

    Example:
        >>> import torch, pycompress.ops as ops
        >>> w = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
        >>> ops.int8_pack_weight(w).numel() == ops.int8_packed_bytes(32, 64)
        True
    """
    check_tensor("w", w, dtypes=(torch.int8,), ndim=2)
    if w.numel() == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
    if w.device.type not in ("cpu", "meta"):
        raise ValueError(f"int8_pack_weight packs weights for the CPU kernels; w is on {w.device}")
    return torch.ops.pycompress.int8_pack_weight(w)


def _check_linear(op, x, w, w_scale, bias):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("w", w, dtypes=(torch.int8,), ndim=2)
    check_tensor("w_scale", w_scale, dtypes=(torch.float32,), ndim=1)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
    n, k = w.shape
    if n < 1 or k < 1:
        raise ValueError(f"w must be non-empty [N, K], got shape {tuple(w.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but w is [N, K] = {tuple(w.shape)}")
    if w_scale.shape[0] != n:
        raise ValueError(f"w_scale must have N = {n} elements (one per row of w), got {w_scale.shape[0]}")
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"bias must have N = {n} elements, got {bias.shape[0]}")
    device = check_same_device(x=x, w=w, w_scale=w_scale, bias=bias)
    check_device_supported(device, op)
    return n, k


def int8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    w_packed: torch.Tensor | None = None,
    act_bits: int = 8,
) -> torch.Tensor:
    """W8A8 linear layer: ``y = dequant(quant(x) @ w.T) + bias`` in one fused kernel.

    Each row of ``x`` is quantized exactly like :func:`quantize_per_token` (symmetric, scale
    ``absmax / 127``), multiplied with the int8 weight in int32, and the epilogue computes
    ``(acc * x_scale[m]) * w_scale[n] + bias[n]`` in fp32 before rounding to ``x.dtype``.

    With ``act_bits=7`` the activations are quantized per token to 7 bits instead (scale
    ``absmax / 63``, ``q`` in [-63, 63], same rounding rules). The integer product is still
    exact; on AVX2 CPUs without VNNI it runs a faster ``vpmaddubsw`` kernel (u8 x s8 pair sums
    cannot saturate with 7-bit activations). Costs about half a bit of activation precision
    per token (FBGEMM's dynamic int8 on x86 uses 7 bits per tensor).

    Args:
        x: float32/float16/bfloat16 tensor ``[..., K]``; leading dims are flattened and restored.
        w: int8 weight ``[N, K]``.
        w_scale: float32 ``[N]`` per-output-channel weight scales.
        bias: optional float ``[N]``.
        w_packed: optional result of :func:`int8_pack_weight` (CPU) to skip per-call packing;
            ignored on CUDA.
        act_bits: 8 (default, scale ``absmax / 127``) or 7 (scale ``absmax / 63``).

    Returns:
        Tensor ``[..., N]`` in ``x.dtype``.

    Example:
        >>> import torch, pycompress.ops as ops
        >>> w = torch.tensor([[127, 0], [0, -127]], dtype=torch.int8)
        >>> y = ops.int8_linear(torch.tensor([[1.0, 2.0]]), w, torch.tensor([1 / 127, 1 / 127]))
        >>> [round(v, 3) for v in y[0].tolist()]
        [1.008, -2.0]
    """
    n, k = _check_linear("int8_linear", x, w, w_scale, bias)
    if isinstance(act_bits, bool) or act_bits not in (7, 8):
        raise ValueError(f"act_bits must be 8 or 7, got {act_bits!r}")
    if w_packed is not None:
        check_tensor("w_packed", w_packed, dtypes=(torch.int8,), ndim=1)
        if w_packed.numel() != int8_packed_bytes(n, k):
            raise ValueError(
                f"w_packed must be int8_pack_weight(w) ({int8_packed_bytes(n, k)} bytes), got {w_packed.numel()}"
            )
        if w_packed.device != w.device:
            w_packed = None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    y = torch.ops.pycompress.int8_linear(x2, w, w_scale, bias, w_packed, int(act_bits))
    return y.reshape(*lead, n)


def int8_linear_w8a16(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only int8 linear layer: ``y = x @ (w * w_scale[:, None]).T + bias``.

    Activations stay in floating point; the int8 weight is dequantized on the fly inside the
    kernel (fp32 accumulation), so memory traffic is one byte per weight — the right choice for
    small batches (decode, M <= 16). CUDA: a GEMV-style kernel for small M. CPU: an AVX2/FMA
    kernel that converts int8 weights to fp32 in registers (activations are read as fp32).

    Args:
        x: float32/float16/bfloat16 tensor ``[..., K]``.
        w: int8 weight ``[N, K]``.
        w_scale: float32 ``[N]``.
        bias: optional float ``[N]``.

    Returns:
        Tensor ``[..., N]`` in ``x.dtype``.

    Example:
        >>> import torch, pycompress.ops as ops
        >>> w = torch.tensor([[2, 0], [0, -4]], dtype=torch.int8)
        >>> ops.int8_linear_w8a16(torch.tensor([[1.0, 3.0]]), w, torch.tensor([0.5, 0.25])).tolist()
        [[1.0, -3.0]]
    """
    n, k = _check_linear("int8_linear_w8a16", x, w, w_scale, bias)
    lead = x.shape[:-1]
    y = torch.ops.pycompress.int8_linear_w8a16(x.reshape(-1, k), w, w_scale, bias)
    return y.reshape(*lead, n)
