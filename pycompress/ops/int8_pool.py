"""Max pooling of quantized images: the validated wrapper over ``torch.ops.pycompress.int8_max_pool2d``
and its fake kernel.

The op takes uint8 or int8 images (any memory format; channels-last is read in place) and returns
the maxima in the same dtype, channels-last. A maximum commutes with every monotonic quantization,
so the result holds exactly the quantized maxima of the real values, with the input's scale and zero
point. torch's own ``max_pool2d`` refuses channels-last uint8 maps of realistic sizes, which is what
int8 CNNs pass between layers.
"""

from __future__ import annotations

import torch

from pycompress import _ext  # noqa: F401  (loads the kernels)
from pycompress.ops._validation import check_device_supported, check_tensor, same_device_fake
from pycompress.ops.int8_conv import _pair

__all__ = ["int8_max_pool2d", "int8_max_pool2d_output_size"]

_QUANT_DTYPES = (torch.uint8, torch.int8)


def _out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    if span < 0:
        return 0
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def int8_max_pool2d_output_size(size, kernel_size, stride=None, padding=0, dilation=1,
                                ceil_mode: bool = False) -> tuple[int, int]:
    """``(Ho, Wo)`` of max pooling over an ``(H, W)`` input, by torch's rule (``ceil_mode`` included)."""
    k, s, p, d = pool_arguments(kernel_size, stride, padding, dilation)
    return (_out_size(size[0], k[0], s[0], p[0], d[0], ceil_mode), _out_size(size[1], k[1], s[1], p[1], d[1], ceil_mode))


def pool_arguments(kernel_size, stride=None, padding=0, dilation=1) -> tuple[list[int], ...]:
    """``(kernel_size, stride, padding, dilation)`` as pairs, checked by torch's rules for max pooling
    (``stride=None`` or ``()`` means the kernel size; padding at most half the kernel size)."""
    k = _pair("kernel_size", kernel_size, 1)
    empty = stride is None or (not isinstance(stride, (int, bool)) and hasattr(stride, "__len__") and len(stride) == 0)
    s = list(k) if empty else _pair("stride", stride, 1)
    p, d = _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    for i in range(2):
        if p[i] > k[i] // 2:
            raise ValueError(f"padding must be at most half of the kernel size, got padding {tuple(p)} "
                             f"for kernel_size {tuple(k)}")
    return k, s, p, d


@torch.library.register_fake("pycompress::int8_max_pool2d")
def _int8_max_pool2d_fake(x, kernel_size, stride, padding, dilation, ceil_mode):
    torch._check(x.dim() == 4, lambda: "int8_max_pool2d: x must be 4-D")
    same_device_fake("int8_max_pool2d", x)
    ho = _out_size(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    wo = _out_size(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    torch._check(ho >= 1 and wo >= 1, lambda: "int8_max_pool2d: the output would be empty")
    return torch.empty((x.shape[0], x.shape[1], ho, wo), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def int8_max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                    ceil_mode: bool = False) -> torch.Tensor:
    """Max pooling of a uint8 / int8 image batch ``x`` ``[N, C, H, W]``, as ``F.max_pool2d`` computes it.

    Arguments as in ``torch.nn.functional.max_pool2d`` (``stride=None`` means the kernel size;
    no ``return_indices``). The result has ``x``'s dtype and channels-last memory format; for a
    quantized tensor it is the quantized maximum of the real values (same scale and zero point).

    Example:
        >>> import torch
        >>> from pycompress import ops
        >>> x = torch.randint(0, 256, (1, 8, 6, 6), dtype=torch.uint8)
        >>> y = ops.int8_max_pool2d(x, 3, stride=2, padding=1)
        >>> bool(torch.equal(y.float(), torch.nn.functional.max_pool2d(x.float(), 3, 2, 1)))
        True
    """
    check_tensor("x", x, dtypes=_QUANT_DTYPES, ndim=4)
    check_device_supported(x.device, "int8_max_pool2d")
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    k, s, p, d = pool_arguments(kernel_size, stride, padding, dilation)
    ho, wo = (_out_size(x.shape[2 + i], k[i], s[i], p[i], d[i], ceil_mode) for i in range(2))
    if ho < 1 or wo < 1:
        raise ValueError(f"the input of spatial size {tuple(x.shape[2:])} with padding {tuple(p)} is smaller than "
                         f"the dilated kernel {tuple(k)}")
    return torch.ops.pycompress.int8_max_pool2d.default(x, k, s, p, d, ceil_mode)
